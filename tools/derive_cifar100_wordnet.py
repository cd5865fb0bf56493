"""Derive the CIFAR-100 -> WordNet category table of the HDL paper (experiment 6).

The paper names 12, 6 and 2 WordNet categories (below) but not the class mapping. They are exactly
the noun synsets at depth 3, 2 and 1 under the root `entity`, so this script:

1. parses WordNet 3.0 `data.noun` (Debian package `wordnet-base`) into {offset: (lemmas, hypernyms)},
   following `@` and `@i` pointers;
2. picks the sense of each category name: a synset whose lemma is the name and whose hypernym is a
   picked synset of the level above (2-level: hypernym is `entity`). This drops e.g. the abstract
   `whole` (05869584) or the root-level `thing` (04424418); all picked offsets are printed;
3. walks every hypernym path of each class synset (offsets from /work/shared/notes/cifar100_wordnet.md,
   i.e. the Neural-Backed Decision Trees list) up to the root and, per path, takes the first ancestor
   that is a picked category at each level;
4. where the paths disagree or a level is missed, applies SENSE_FIXES / OVERRIDES (each with a reason;
   an override must be one of the chains WordNet's paths give), then checks that every 12-level
   category has one 6-level parent and every 6-level category one 2-level parent.

Usage: python tools/derive_cifar100_wordnet.py [/usr/share/wordnet/data.noun] > tools/cifar100_wordnet_table.txt
"""

import sys
from collections import Counter

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

# Class synsets in the note that are plainly the wrong sense and reach no 12/6-level category.
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
OVERRIDES = {
    "baby": _PERSON,
    "boy": _PERSON,
    "girl": _PERSON,
    "man": _PERSON,
    "woman": _PERSON,
    "apple": _FRUIT,
    "orange": _FRUIT,
    "pear": _FRUIT,
}


def parse_data_noun(path):
    """{offset: (lemmas, hypernym offsets)} from a WordNet data.noun file (`@` and `@i` pointers)."""
    synsets = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # license header
                continue
            fields = line.split(" | ")[0].split()
            n_words = int(fields[3], 16)
            lemmas = [fields[4 + 2 * i].lower() for i in range(n_words)]
            i = 4 + 2 * n_words
            n_ptrs, i = int(fields[i]), i + 1
            hypernyms = [
                fields[i + 4 * k + 1]
                for k in range(n_ptrs)
                if fields[i + 4 * k] in ("@", "@i") and fields[i + 4 * k + 2] == "n"
            ]
            synsets[fields[0]] = (lemmas, hypernyms)
    return synsets


def pick_category_senses(synsets):
    """Per level, {offset: paper name}: name-matching synsets whose hypernym is picked one level up."""
    parents = {o for o, (lem, hyp) in synsets.items() if lem[0] == "entity" and not hyp}
    levels = []
    for names in (LEVEL2, LEVEL6, LEVEL12):
        wanted = {n.replace(" ", "_"): n for n in names}
        level = {o: wanted[l] for o, (lem, hyp) in synsets.items() for l in lem if l in wanted and parents & set(hyp)}
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


def derive(synsets):
    levels = pick_category_senses(synsets)
    table, notes = [], {}
    for name, wnid in zip(CIFAR100, WNIDS):
        if name in SENSE_FIXES:
            wnid, reason = SENSE_FIXES[name]
            notes.setdefault(f"sense fix: {reason}", []).append(name)
        chains = candidate_chains(synsets, wnid, levels)
        if name in OVERRIDES:
            chain, reason = OVERRIDES[name]
            assert len(chains) > 1 and chain in chains, (name, chains)
            alts = sorted(c[:2] for c in chains if c != chain)
            notes.setdefault(f"override -> {chain[:2]} (not {alts}): {reason}", []).append(name)
        else:
            assert len(chains) == 1 and None not in next(iter(chains)), f"needs a decision: {name} {chains}"
            (chain,) = chains
        table.append((name,) + chain + (wnid, synsets[wnid][0][0]))
    return levels, table, notes


def check_chain(table):
    """Every 12-category has one 6-parent and every 6-category one 2-parent; return the parent maps."""
    maps = []
    for child, parent in ((1, 2), (2, 3)):
        parents = {}
        for row in table:
            parents.setdefault(row[child], set()).add(row[parent])
        bad = {c: p for c, p in parents.items() if len(p) > 1}
        assert not bad, f"inconsistent parent chain: {bad}"
        maps.append({c: p.pop() for c, p in parents.items()})
    return maps


def main(path):
    synsets = parse_data_noun(path)
    levels, table, notes = derive(synsets)
    up12, up6 = check_chain(table)
    print(f"# Generated by tools/derive_cifar100_wordnet.py from {path} (WordNet 3.0).")
    for title, lv in zip(("12", "6", "2"), levels):
        senses = ", ".join(f"{n}={o}" for o, n in sorted(lv.items(), key=lambda x: x[1]))
        print(f"# {title}-level senses used: {senses}")
    for note, names in notes.items():
        print(f"# {', '.join(names)}: {note}")
    for title, names, col in (("12", LEVEL12, 1), ("6", LEVEL6, 2), ("2", LEVEL2, 3)):
        counts = Counter(row[col] for row in table)
        print(f"# {title}-level class counts: " + ", ".join(f"{n}={counts[n]}" for n in names))
        unused = [n for n in names if not counts[n]]
        print(f"#   unused: {unused if unused else 'none'}")
    print("# parent chain: " + "; ".join(f"{c}>{up12[c]}>{up6[up12[c]]}" for c in LEVEL12 if c in up12))
    print(f"LEVEL12_NAMES = {LEVEL12!r}")
    print(f"LEVEL6_NAMES = {LEVEL6!r}")
    print(f"LEVEL2_NAMES = {LEVEL2!r}")
    print("CIFAR100_WORDNET = [  # (fine_name, level12, level6, level2)  # wnid lemma")
    for row in table:
        print(f"    {row[:4]!r},  # n{row[4]} {row[5]}")
    print("]")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/wordnet/data.noun")
