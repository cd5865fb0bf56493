"""Derive the CIFAR-100 -> WordNet category tables of the HDL paper (experiment 6), two readings.

The paper names 12, 6 and 2 WordNet categories (below) and says "we extracted {12, 6, 2} classes per
layer from Cifar-100", but gives no class mapping. The categories are exactly the noun synsets at
depth 3, 2 and 1 under the root `entity`. Which synset a class *is* decides its categories, and two
readings are derived here from WordNet 3.0 (Debian package `wordnet-base`, /usr/share/wordnet):

- first-sense (the default of hdl_stack.py): each class name's most frequent noun sense, the first
  synset index.noun lists for the name's first word (lawn_mower -> lawn, palm_tree -> palm), which is
  what nltk's `wordnet.synsets(word)[0]` returns. This fills all 12 / 6 / 2 categories, as the paper
  has them (table -> arrangement, lawn -> location, palm -> part, the fur and wood senses ->
  substance). Whole names (nltk finds lawn_mower, palm_tree, oak_tree, sweet_pepper) leave location
  and part empty, so the first word is the reading that gives the paper's counts.
- fixed-synset (`--levels fixed-synset`): one fixed synset per class, the Neural-Backed Decision
  Trees list in /work/shared/notes/cifar100_wordnet.md, with four wrong senses fixed (SENSE_FIXES).
  86 classes fall under `whole`; arrangement, substance, part and location get no class.

Per reading: parse data.noun (hypernyms `@`, `@i`) and index.noun (sense order); pick the sense of
each category name (a synset with that lemma whose hypernym is a picked synset one level up; level
2 under `entity`); walk every hypernym path of each class synset to the root, taking per path the
first ancestor that is a picked category at each level; where paths disagree or miss a level, apply
the listed OVERRIDES (each must be one of the chains the paths give, with its reason); check that
every 12-level category has one 6-level parent and every 6-level category one 2-level parent.

Rewrites the tables at the end of hdl_stack.py, the block between the lines BEGIN_MARKER and END_MARKER
(the script stays self-contained: no WordNet or nltk needed at run time; nothing outside the block
changes), and writes docs/hdl_cifar100_levels.md (every class that moves between the readings, with the
sense each takes):

    python tools/derive_cifar100_wordnet.py                       # WordNet in /usr/share/wordnet
    python tools/derive_cifar100_wordnet.py --wordnet-dir DIR --nltk   # also check against nltk

--nltk checks the first-sense synsets against `nltk.corpus.wordnet.synsets(word)[0]` (pip install
nltk; its WordNet 3.0 corpus under NLTK_DATA, e.g. Debian's files in NLTK_DATA/corpora/wordnet plus a
`lexnames` file). nltk is a dependency of this check only, never of the scripts or tests.
"""

import argparse
import json
import sys
import textwrap
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LEVEL12 = [
    "whole",
    "person",
    "phenomenon",
    "body of water",
    "arrangement",
    "substance",
    "solid",
    "geological formation",
    "part",
    "collection",
    "location",
    "land",
]
LEVEL6 = ["object", "causal agent", "process", "thing", "group", "matter"]
LEVEL2 = ["physical entity", "abstraction"]
READINGS = ("first-sense", "fixed-synset")
SOURCE = "WordNet 3.0 (Debian's wordnet-base: data.noun, index.noun)"

CIFAR100 = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard
lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark
shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone
television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()

# WordNet 3.0 noun offsets in CIFAR-100 order (from the shared note, NBDT's wnids without the 'n').
WNIDS = """07739125 02512752 09827683 02131653 02363005 02818832 02206856 02164464 02834778 02876657
02881193 10285313 02898711 02924116 02274259 02437136 02946921 02980441 02309337 02402425
03001627 02481823 03046257 11439690 02233338 04256520 01976957 01697178 03147509 01699831
02581957 02503517 02657368 08438533 02118333 10129825 02342885 03544360 01877134 03614007
03636248 03649909 02128385 02129165 01674464 01982650 10287213 12752205 03790512 09359803
02330245 13001041 12268246 07747607 12041446 02444819 12582231 07767847 03930630 11608250
09393605 03959485 11900569 02346627 01874928 02324045 02508021 01495701 04096066 04099429
12620196 09426788 02076196 01482330 01891633 07476495 04233124 01944390 01726692 01772222
02355227 04335435 11978233 12901264 04379243 04389033 04401088 06277280 02129604 04465501
04468005 07794452 12454159 01662784 04550184 02062744 12724942 02114100 10787470 01922303""".split()

# fixed-synset: class synsets in the note that are plainly the wrong sense for CIFAR-100's images.
SENSE_FIXES = {
    "skunk": (
        "02445715",
        "note's 07476495 is 'shutout, skunk' (a defeat, under abstraction>event); "
        "use the animal 02445715 'skunk, polecat, wood_pussy'",
    ),
    "trout": (
        "02537085",
        "note's 07794452 is trout the food ('flesh of ... fishes', under food>solid>matter); "
        "CIFAR-100's trout are live fish (superclass 'fish'): use the fish 02537085 (whole>object)",
    ),
    "dolphin": (
        "02068974",
        "note's 02581957 is the dolphinfish (mahimahi); CIFAR-100's dolphin is the toothed whale "
        "(superclass 'aquatic mammals'): use 02068974 (same whole>object chain, so no label changes)",
    ),
    "sweet_pepper": (
        "07720615",
        "note's 12901264 is the pepper shrub (whole>object); CIFAR-100's images are the "
        "vegetable, like apple/orange/pear of the same superclass 'fruit and vegetables', which "
        "use the food sense: use 07720615 sweet_pepper the vegetable (food>solid>matter)",
    ),
}

# Classes whose hypernym paths give different (12, 6, 2) chains: the chosen chain and why.
_PERSON = (
    ("person", "causal agent", "physical entity"),
    "person's hypernyms are causal_agent and organism; only entity>physical_entity>causal_agent>person "
    "puts person at the paper's depth (the organism path would put person under object)",
)
_FRUIT = (
    ("solid", "matter", "physical entity"),
    "synset is the edible fruit (lexicographer file noun.food); take its food path "
    "edible_fruit>produce>food>solid (also the shorter one) over the botanical fruit>natural_object>whole",
)
_MATERIAL = (
    ("substance", "matter", "physical entity"),
    "synset is a fur or a wood (material>substance); substance's second hypernym, part>relation>"
    "abstraction, reaches no 6-level category, so the one complete chain substance>matter is taken",
)
OVERRIDES = {
    "fixed-synset": {
        **dict.fromkeys(("baby", "boy", "girl", "man", "woman"), _PERSON),
        **dict.fromkeys(("apple", "orange", "pear"), _FRUIT),
    },
    "first-sense": {
        # The first senses of shrew, skunk, tiger, whale and sweet are people (a scold, a rotter, a
        # fierce person, a giant, the phonetician Henry Sweet).
        **dict.fromkeys(("baby", "boy", "girl", "man", "woman", "shrew", "skunk", "tiger", "whale"), _PERSON),
        "sweet_pepper": _PERSON,
        **dict.fromkeys(("apple", "orange", "pear"), _FRUIT),
        **dict.fromkeys(("beaver", "leopard", "otter", "raccoon", "maple_tree", "oak_tree"), _MATERIAL),
    },
}


def parse_data_noun(path):
    """{offset: (lemmas, hypernym offsets, gloss)} from a WordNet data.noun file (`@` and `@i` pointers)."""
    synsets = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # license header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            n_words = int(fields[3], 16)
            lemmas = [fields[4 + 2 * i].lower() for i in range(n_words)]
            i = 4 + 2 * n_words
            n_ptrs, i = int(fields[i]), i + 1
            hypernyms = [
                fields[i + 4 * k + 1]
                for k in range(n_ptrs)
                if fields[i + 4 * k] in ("@", "@i") and fields[i + 4 * k + 2] == "n"
            ]
            synsets[fields[0]] = (lemmas, hypernyms, gloss.strip())
    return synsets


def parse_index_noun(path):
    """{lemma: [synset offsets]} from index.noun, senses in WordNet's order (most frequent first, by the
    tagged-corpus counts): the order nltk's `synsets(lemma)` returns the noun senses in."""
    senses = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split()
            n_synsets, n_ptrs = int(fields[2]), int(fields[3])
            senses[fields[0]] = fields[6 + n_ptrs : 6 + n_ptrs + n_synsets]  # lemma pos n p [ptrs] n tagged offsets
    return senses


def pick_category_senses(synsets):
    """Per level, {offset: paper name}: name-matching synsets whose hypernym is picked one level up."""
    parents = {o for o, (lem, hyp, _) in synsets.items() if lem[0] == "entity" and not hyp}
    levels = []
    for names in (LEVEL2, LEVEL6, LEVEL12):
        wanted = {n.replace(" ", "_"): n for n in names}
        level = {
            o: wanted[l] for o, (lem, hyp, _) in synsets.items() for l in lem if l in wanted and parents & set(hyp)
        }
        missing = set(names) - set(level.values())
        assert not missing, f"no WordNet sense found for {missing}"
        levels.append(level)
        parents = set(level)
    return levels[2], levels[1], levels[0]  # 12, 6, 2


def hypernym_paths(synsets, offset):
    """All paths [offset, parent, ..., root]."""
    hyps = synsets[offset][1]
    if not hyps:
        return [[offset]]
    return [[offset] + p for h in hyps for p in hypernym_paths(synsets, h)]


def candidate_chains(synsets, offset, levels):
    """Set of (12, 6, 2) chains, one per hypernym path: first ancestor in each level (None if none)."""
    chains = set()
    for path in hypernym_paths(synsets, offset):
        chains.add(tuple(next((lv[o] for o in path[1:] if o in lv), None) for lv in levels))
    return chains


def class_synsets(reading, index):
    """[(class, word looked up or None, offset, sense-fix reason or None)] in CIFAR-100 order."""
    rows = []
    for name, wnid in zip(CIFAR100, WNIDS):
        if reading == "first-sense":
            word = name.split("_")[0]  # lawn_mower -> lawn: the reading that gives the paper's 12 / 6 / 2
            if word not in index:
                raise ValueError(f"{name}: '{word}' has no noun entry in index.noun")
            rows.append((name, word, index[word][0], None))
        elif name in SENSE_FIXES:
            rows.append((name, None, *SENSE_FIXES[name]))
        else:
            rows.append((name, None, wnid, None))
    return rows


def derive(synsets, index, reading):
    """(table, notes): table rows (class, level12, level6, level2, offset, word); notes {decision: [classes]}."""
    levels = pick_category_senses(synsets)
    table, notes = [], {}
    for name, word, offset, fix in class_synsets(reading, index):
        if fix:
            notes.setdefault(f"sense fix: {fix}", []).append(name)
        chains = candidate_chains(synsets, offset, levels)
        if name in OVERRIDES[reading]:
            chain, reason = OVERRIDES[reading][name]
            assert len(chains) > 1 and chain in chains, (reading, name, chains)
            alts = sorted(c[:2] for c in chains if c != chain)
            notes.setdefault(f"override -> {chain[:2]} (not {alts}): {reason}", []).append(name)
        else:
            assert len(chains) == 1 and None not in next(iter(chains)), f"{reading} needs a decision: {name} {chains}"
            (chain,) = chains
        table.append((name, *chain, offset, word))
    check_chain(table)
    return table, notes


def check_chain(table):
    """Every 12-category has one 6-parent and every 6-category one 2-parent; return the parent maps."""
    maps = []
    for child, parent in ((1, 2), (2, 3)):
        parents = {}
        for row in table:
            parents.setdefault(row[child], set()).add(row[parent])
        bad = {c: p for c, p in parents.items() if len(p) > 1}
        assert not bad, f"inconsistent parent chain: {bad}"
        maps.append({c: next(iter(p)) for c, p in parents.items()})
    return maps


def check_with_nltk(index):
    """Assert that nltk's synsets(word)[0] is index.noun's first sense for every first-sense word."""
    from nltk.corpus import wordnet as wn  # the tool's optional check only
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    # nltk >= 3.9 maps other WordNet versions to 3.0 through index.sense, which Debian's files lack;
    # WordNet 3.0 itself needs no map.
    WordNetCorpusReader.map_wn = lambda self, version="wordnet": None

    for name, word, offset, _ in class_synsets("first-sense", index):
        first = wn.synsets(word)[0]
        assert (first.pos(), f"{first.offset():08d}") == ("n", offset), (name, word, first, offset)
    return len(CIFAR100)


def synset_label(synsets, offset):
    lemmas, _, gloss = synsets[offset]
    return f"n{offset} {', '.join(lemmas[:2])} ('{gloss.split(';')[0].strip()}')"


def counts_line(table, names, column):
    counts = Counter(row[column] for row in table)
    empty = [n for n in names if not counts[n]]
    return ", ".join(f"{n} {counts[n]}" for n in names) + (f" (empty: {', '.join(empty)})" if empty else "")


def q(text):
    return json.dumps(text)  # double quotes, as ruff format writes them


def comment_lines(text, prefix="# "):
    return textwrap.wrap(text, 116, initial_indent=prefix, subsequent_indent="#   ")


BEGIN_MARKER = "# --- CIFAR-100 WordNet levels: generated by tools/derive_cifar100_wordnet.py, do not edit ---"
END_MARKER = "# --- end of generated tables ---"


def py_list(var, names):
    """`VAR = [...]` as ruff format writes it: on one line if it fits in 120 characters, else one name a line."""
    line = f"{var} = [{', '.join(q(n) for n in names)}]"
    return [line] if len(line) <= 120 else [f"{var} = ["] + [f"    {q(n)}," for n in names] + ["]"]


def render_block(synsets, derived):
    """hdl_stack.py's generated block, markers included: the paper's category names and one table per
    reading, one line per class (ruff-format clean)."""
    lines = [
        BEGIN_MARKER,
        "# CIFAR-100 classes -> the paper's WordNet categories (experiment 6: 12 / 6 / 2; head outputs follow the",
        "# names' order), two readings, derived offline (no WordNet or nltk at run time) from",
        f"# {SOURCE}.",
        "# first-sense (the default, --levels first-sense): each class name's most frequent noun sense (its first",
        "# word's first index.noun sense, nltk's synsets(word)[0]); fills every category, as the paper.",
        "# fixed-synset (--levels fixed-synset): one fixed synset per class (the NBDT list, four senses fixed);",
        "# leaves arrangement, substance, part and location empty. docs/hdl_cifar100_levels.md lists every class",
        "# that moves between them, with the sense each reading takes.",
    ]
    for var, names in (("LEVEL12_NAMES", LEVEL12), ("LEVEL6_NAMES", LEVEL6), ("LEVEL2_NAMES", LEVEL2)):
        lines += py_list(var, names)
    for reading in READINGS:
        table, notes = derived[reading]
        var = "WORDNET_" + reading.upper().replace("-", "_")
        lines += ["", f"# {reading}: decisions where a synset's hypernym paths disagree, or its sense is fixed:"]
        for note, names in notes.items():
            lines += comment_lines(f"{', '.join(names)}: {note}", prefix="# - ")
        for title, names, column in (("12", LEVEL12, 1), ("6", LEVEL6, 2), ("2", LEVEL2, 3)):
            lines += comment_lines(f"{title}-level classes: {counts_line(table, names, column)}")
        lines.append(
            f"{var} = [  # (class, level12, level6, level2)  # synset"
            + (" (word looked up)" if reading == "first-sense" else "")
        )
        for name, l12, l6, l2, offset, word in table:
            looked_up = f" (word {q(word)})" if word and word != name else ""
            row = ", ".join(q(v) for v in (name, l12, l6, l2))
            lines.append(f"    ({row}),  # n{offset} {synsets[offset][0][0]}{looked_up}")
        lines.append("]")
    lines += [
        "",
        "# reading -> [(fine_name, level12, level6, level2)]",
        'WORDNET_TABLES = {"first-sense": WORDNET_FIRST_SENSE, "fixed-synset": WORDNET_FIXED_SYNSET}',
        END_MARKER,
    ]
    return "\n".join(lines) + "\n"


def generated_block(text):
    """(start, end) of the generated block in a script's text: from the begin marker's line through the end
    marker's line and its newline. Raises ValueError unless each marker is there exactly once, in order."""
    counts = [sum(line == m for line in text.splitlines()) for m in (BEGIN_MARKER, END_MARKER)]
    if counts != [1, 1]:
        raise ValueError(f"expected each marker line once, found {counts}: {BEGIN_MARKER!r} / {END_MARKER!r}")
    start = text.index(BEGIN_MARKER + "\n")
    end = text.index(END_MARKER + "\n") + len(END_MARKER) + 1
    if not start < end or (start and text[start - 1] != "\n"):
        raise ValueError("the markers must start lines, the begin marker first")
    return start, end


def replace_block(text, block):
    """The script's text with its generated block (markers included) replaced by block."""
    start, end = generated_block(text)
    return text[:start] + block + text[end:]


def render_moves(synsets, derived):
    """docs/hdl_cifar100_levels.md: the two readings' counts and every class that moves, with both senses."""
    first, fixed = derived["first-sense"][0], derived["fixed-synset"][0]
    moved = [(a, b) for a, b in zip(first, fixed) if a[1:4] != b[1:4]]
    n_moved = [sum(a[c] != b[c] for a, b in moved) for c in (1, 2, 3)]
    lines = [
        "# CIFAR-100's WordNet levels for the HDL paper: the two readings",
        "",
        f"Generated by `tools/derive_cifar100_wordnet.py` from {SOURCE}.",
        "The tables are at the end of `hdl_stack.py` (between the generated-block markers); `--levels` picks one.",
        "",
        'The paper (experiment 6) names 12 / 6 / 2 categories and says "we extracted {12, 6, 2} classes per',
        'layer from Cifar-100", without the class mapping.',
        "",
        "- **first-sense** (the default): each class name's most frequent WordNet noun sense, i.e. nltk's",
        "  `wordnet.synsets(word)[0]` for the name's first word (lawn_mower -> lawn, palm_tree -> palm).",
        "  Every category gets a class, as in the paper.",
        "- **fixed-synset** (`--levels fixed-synset`): one fixed synset per class (the Neural-Backed",
        "  Decision Trees list, with skunk, trout, dolphin and sweet_pepper fixed to the pictured sense).",
        "",
        "Classes per category:",
        "",
        "| reading | 12 categories | 6 | 2 |",
        "|---|---|---|---|",
    ]
    for reading, table in (("first-sense", first), ("fixed-synset", fixed)):
        cells = [counts_line(table, names, c) for names, c in ((LEVEL12, 1), (LEVEL6, 2), (LEVEL2, 3))]
        lines.append(f"| {reading} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"{len(moved)} classes move between the readings ({n_moved[0]} at the 12-category level, {n_moved[1]} at",
        f"6, {n_moved[2]} at 2). The reason is always the synset each reading takes:",
        "",
        "| class | fixed-synset: synset | chain | first-sense: word, its first sense | chain |",
        "|---|---|---|---|---|",
    ]
    for a, b in moved:
        lines.append(
            f"| {a[0]} | {synset_label(synsets, b[4])} | {' > '.join(b[1:4])} | "
            f"'{a[5]}': {synset_label(synsets, a[4])} | {' > '.join(a[1:4])} |"
        )
    for reading in READINGS:
        lines += ["", f"Decisions of the {reading} reading (where a synset's paths disagree, or a sense is fixed):", ""]
        lines += [f"- {', '.join(names)}: {note}" for note, names in derived[reading][1].items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wordnet-dir", default="/usr/share/wordnet", help="folder with data.noun and index.noun")
    p.add_argument(
        "--script", default=ROOT / "hdl_stack.py", type=Path, help="the script whose generated block gets the tables"
    )
    p.add_argument("--moves", default=ROOT / "docs" / "hdl_cifar100_levels.md", type=Path)
    p.add_argument("--nltk", action="store_true", help="check the first senses against nltk's synsets(word)[0]")
    a = p.parse_args(argv)
    wordnet = Path(a.wordnet_dir)
    synsets, index = parse_data_noun(wordnet / "data.noun"), parse_index_noun(wordnet / "index.noun")
    if a.nltk:
        print(f"nltk agrees on the first sense of all {check_with_nltk(index)} classes", file=sys.stderr)
    derived = {reading: derive(synsets, index, reading) for reading in READINGS}
    a.script.write_text(replace_block(a.script.read_text(), render_block(synsets, derived)))
    a.moves.parent.mkdir(parents=True, exist_ok=True)
    a.moves.write_text(render_moves(synsets, derived))
    print(f"wrote the tables in {a.script} and {a.moves}", file=sys.stderr)


if __name__ == "__main__":
    main()
