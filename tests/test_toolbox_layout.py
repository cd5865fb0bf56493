"""common.py holds what several programs share: a top-level function, class or constant that only
one of the five paper scripts uses (and nothing else in common.py) lives in that script, and code
that only tests use does not live in common.py. Read from the source (ast), nothing is run."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("hiernet.py", "merged_resnet.py", "coarse_outer_product.py", "latent_string.py", "hdl_stack.py")
# The other programs that import common (tests do not count as users).
PROGRAMS = (*SCRIPTS, "grouping.py", "bench.py", *sorted(p.name for p in (ROOT / "tools").glob("*.py")))

# Names that stay in common.py although one script alone uses them, each with its reason.
ONE_SCRIPT_EXCEPTIONS = {
    "positive_fraction": "one of the argparse number checks that _number_check makes; the family stays together",
}


def top_level_names(tree):
    """{name: (first line, last line, decorated)} of common.py's functions, classes and constants."""
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = (node.lineno, node.end_lineno, bool(node.decorator_list))
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = (node.lineno, node.end_lineno, False)
    return names


def common_attributes(path):
    """The names a file reads as common.NAME."""
    tree = ast.parse(path.read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "common"
    }


def survey():
    tree = ast.parse((ROOT / "common.py").read_text())
    names = top_level_names(tree)
    reads = [(node.id, node.lineno) for node in ast.walk(tree) if isinstance(node, ast.Name)]
    used_inside = {name for name, line in reads if name in names and not names[name][0] <= line <= names[name][1]}
    users = {name: [] for name in names}
    for program in PROGRAMS:
        path = ROOT / program if (ROOT / program).exists() else ROOT / "tools" / program
        for name in common_attributes(path) & set(names):
            users[name].append(program)
    return names, used_inside, users


def test_code_of_one_script_lives_in_that_script():
    names, used_inside, users = survey()
    single = {
        name: users[name][0]
        for name in names
        if name not in used_inside and len(users[name]) == 1 and users[name][0] in SCRIPTS
    }
    misplaced = {name: script for name, script in single.items() if name not in ONE_SCRIPT_EXCEPTIONS}
    assert not misplaced, f"used by one script alone, so it belongs in that script: {misplaced}"
    stale = sorted(set(ONE_SCRIPT_EXCEPTIONS) - set(single))
    assert not stale, f"ONE_SCRIPT_EXCEPTIONS names what is no longer used by one script alone: {stale}"


def test_no_code_that_only_tests_use():
    names, used_inside, users = survey()
    # A decorated function (an atexit hook) is used by its decorator.
    unused = sorted(name for name, (_, _, decorated) in names.items() if not decorated and not users[name])
    unused = [name for name in unused if name not in used_inside]
    assert not unused, f"common.py defines what no program uses (a test's helper belongs in the test): {unused}"


def test_every_common_name_a_file_reads_exists():
    defined = set(top_level_names(ast.parse((ROOT / "common.py").read_text())))
    defined |= {"__file__", "__name__", "__doc__"}
    files = [ROOT / p for p in ("grouping.py", "bench.py", *SCRIPTS)]
    files += sorted((ROOT / "tools").glob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
    missing = {path.relative_to(ROOT).as_posix(): sorted(common_attributes(path) - defined) for path in files}
    missing = {path: names for path, names in missing.items() if names}
    assert not missing, f"common.NAME read where common.py defines no NAME: {missing}"
