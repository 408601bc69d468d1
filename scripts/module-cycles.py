#!/usr/bin/env python3
"""Reports import cycles between the files, and between the top-level modules, of Rust crates.

    scripts/module-cycles.py [--include-tests] [CRATE_DIR ...]   (default: every crates/*)

For each crate (a directory with src/lib.rs or src/main.rs) it follows the `mod` declarations
from the crate root to find the module files, reads each file's paths into the crate
(`use crate::…`, `crate::x::…` in code, `super::…`, `self::…`, and `child::…` for the modules a
file declares), resolves each path to the file that defines it (following `pub use`
re-exports), and prints every strongly connected component of more than one file (a cycle),
then the same for top-level modules (`a/b.rs` and `a/mod.rs` count as `a`; the crate root is
`(root)`). Comments, strings and `#[cfg(test)]` items are skipped unless `--include-tests`
(tests then count too). Exits 1 when it found a cycle, 0 otherwise.

A textual reading, not the compiler's: a path inside a macro counts, a glob import
(`use super::*`) counts as a dependency on the module it names, and a name that is not a module
resolves to the file that declares the enclosing module.
"""

import os
import re
import sys

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_comments_and_strings(text):
    """Blanks out comments, string and char literals, keeping line structure."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and not re.match(r"\w", text[i - 1 : i] or " "):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            j = n if end < 0 else end + 1 + len(hashes)
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.[^']*|[^\\'])'", text[i:]):
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            out.append("' '")
            i += m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching_brace(text, start):
    """Index just past the `}` closing the `{` at `start`."""
    depth = 0
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


CFG_TEST = re.compile(r"#\[cfg\((test|any\([^\]]*\btest\b[^\]]*\))\)\]")


def strip_test_items(text):
    """Removes items under `#[cfg(test)]` (and `cfg(any(test, …))`)."""
    while True:
        m = CFG_TEST.search(text)
        if not m:
            return text
        j = m.end()
        # The item ends at its first `;` or at the brace matching its first `{`.
        semi, brace = text.find(";", j), text.find("{", j)
        if brace >= 0 and (semi < 0 or brace < semi):
            end = matching_brace(text, brace)
        else:
            end = len(text) if semi < 0 else semi + 1
        text = text[: m.start()] + "\n" * text.count("\n", m.start(), end) + text[end:]


def expand_use_tree(tree):
    """`crate::{a::b, c::{d as e, self}}` -> [([crate,a,b], b), ([crate,c,d], e), ([crate,c], c)]:
    each imported path with the name it is imported as."""
    tokens = re.findall(IDENT + r"|::|[{},*]", tree)
    pos = 0

    def parse_list(prefix):
        # items separated by `,` until `}` or the end
        nonlocal pos
        out = []
        while pos < len(tokens) and tokens[pos] != "}":
            out.extend(parse_item(prefix))
            if pos < len(tokens) and tokens[pos] == ",":
                pos += 1
        return out

    def parse_item(prefix):
        nonlocal pos
        segs, alias = list(prefix), None
        while pos < len(tokens):
            tok = tokens[pos]
            if tok == "{":
                pos += 1
                out = parse_list(segs)
                pos += 1  # the `}`
                return out
            if tok == "*":
                pos += 1
                return [(segs, None)]
            if tok == "::":
                pos += 1
                continue
            if tok in (",", "}"):
                break
            if tok == "as":
                alias = tokens[pos + 1] if pos + 1 < len(tokens) else None
                pos += 2
                continue
            if tok != "self" or not segs:
                segs.append(tok)
            pos += 1
        return [(segs, alias or (segs[-1] if segs else None))]

    return [(p, name) for p, name in parse_list([]) if p]


class Crate:
    def __init__(self, src):
        self.src = src
        self.include_tests = False
        self.files = {}  # module path tuple -> file path
        self.children = {}  # module path tuple -> set of child module names
        self.texts = {}

    def load(self, include_tests):
        self.include_tests = include_tests
        root = None
        for name in ("lib.rs", "main.rs"):
            if os.path.exists(os.path.join(self.src, name)):
                root = os.path.join(self.src, name)
                break
        if root is None:
            return False
        self._load_module((), root)
        return True

    def _load_module(self, modpath, path):
        with open(path, encoding="utf-8") as f:
            text = strip_comments_and_strings(f.read())
        if not self.include_tests:
            text = strip_test_items(text)
        self.files[modpath] = path
        self.texts[modpath] = text
        self.children[modpath] = set()
        base = os.path.dirname(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        child_dir = base if stem in ("lib", "main", "mod") else os.path.join(base, stem)
        for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*;", text):
            name = m.group(1)
            for candidate in (
                os.path.join(child_dir, name + ".rs"),
                os.path.join(child_dir, name, "mod.rs"),
            ):
                if os.path.exists(candidate):
                    self.children[modpath].add(name)
                    self._load_module(modpath + (name,), candidate)
                    break

    def reexports(self, modpath):
        """Names `modpath` re-exports with `pub use`, each -> its absolute path."""
        out = {}
        text = self.texts.get(modpath, "")
        for m in re.finditer(r"\bpub(\([^)]*\))?\s+use\s+([^;]+);", text):
            for p, name in expand_use_tree(m.group(2)):
                absolute = self.absolute(modpath, p)
                if absolute and name:
                    out[name] = absolute
        return out

    def absolute(self, modpath, segs):
        """A path written in `modpath` -> an absolute module path, or None (external)."""
        if not segs:
            return None
        head, rest = segs[0], segs[1:]
        if head == "crate":
            return list(rest)
        if head == "self":
            return list(modpath) + list(rest)
        if head == "super":
            base = list(modpath)
            while segs and segs[0] == "super":
                if not base:
                    return None
                base.pop()
                segs = segs[1:]
            return base + list(segs)
        if head in self.children.get(modpath, ()):
            return list(modpath) + list(segs)
        return None

    def resolve(self, absolute, seen=None):
        """An absolute path -> the module (tuple) whose file defines it."""
        seen = seen or set()
        best = ()
        for k in range(len(absolute), -1, -1):
            if tuple(absolute[:k]) in self.files:
                best = tuple(absolute[:k])
                break
        rest = absolute[len(best) :]
        if rest:
            target = self.reexports(best).get(rest[0])
            key = (best, rest[0])
            if target and key not in seen:
                seen.add(key)
                return self.resolve(list(target) + list(rest[1:]), seen)
        return best

    def edges(self):
        """{module: {module it uses}} between module files."""
        graph = {m: set() for m in self.files}
        self.why = {}
        for modpath, text in self.texts.items():
            inline = [
                (m.start(), matching_brace(text, m.end() - 1), m.group(1))
                for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*\{", text)
            ]

            def scope(pos):
                # The module a position is in, inline modules (`mod x { … }`) included.
                return modpath + tuple(name for start, end, name in inline if start < pos < end)

            paths = []
            for m in re.finditer(r"\buse\s+([^;]+);", text):
                paths.extend((scope(m.start()), p) for p, _ in expand_use_tree(m.group(1)))
            code = re.sub(r"\buse\s+[^;]+;", lambda m: " " * len(m.group(0)), text)
            names = ["crate", "super", "self"] + sorted(self.children[modpath])
            pattern = r"(?<![\w:])((?:" + "|".join(names) + r")(?:::" + IDENT + r")+)"
            for m in re.finditer(pattern, code):
                paths.append((scope(m.start()), m.group(1).split("::")))
            for where, p in paths:
                absolute = self.absolute(where, p)
                if absolute is None:
                    continue
                target = self.resolve(absolute)
                if target != modpath:
                    graph[modpath].add(target)
                    self.why.setdefault((modpath, target), "::".join(p))
        return graph

    def name(self, modpath):
        return os.path.relpath(self.files[modpath], self.src)


def cycles(graph):
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def describe(component, graph, label, why=None):
    """One line per edge inside the component (with the first path behind it, if known)."""
    members = set(component)
    lines = []
    for v in component:
        for w in sorted(graph[v] & members):
            reason = why(v, w) if why else ""
            lines.append(f"    {label(v)} -> {label(w)}" + (f"  ({reason})" if reason else ""))
    return lines


def check(crate_dir, include_tests):
    crate = Crate(os.path.join(crate_dir, "src"))
    if not crate.load(include_tests):
        return 0
    graph = crate.edges()
    found = 0
    for comp in cycles(graph):
        found += 1
        print(f"{crate_dir}: files in a cycle: {', '.join(crate.name(m) for m in comp)}")
        print("\n".join(describe(comp, graph, crate.name, lambda v, w: crate.why[(v, w)])))
    top, top_why = {}, {}
    for v, ws in sorted(graph.items()):
        a = v[:1]
        top.setdefault(a, set())
        for w in sorted(ws):
            if w[:1] != a:
                top[a].add(w[:1])
                top_why.setdefault((a, w[:1]), f"{crate.name(v)}: {crate.why[(v, w)]}")
    label = lambda m: m[0] if m else "(root)"  # noqa: E731
    for comp in cycles(top):
        found += 1
        print(f"{crate_dir}: top-level modules in a cycle: {', '.join(label(m) for m in comp)}")
        print("\n".join(describe(comp, top, label, lambda v, w: top_why[(v, w)])))
    if not found:
        print(f"{crate_dir}: no cycles ({len(graph)} files)")
    return found


def main(argv):
    include_tests = "--include-tests" in argv
    dirs = [a for a in argv if not a.startswith("--")]
    if not dirs:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        crates = os.path.join(here, "crates")
        dirs = sorted(
            os.path.relpath(os.path.join(crates, d))
            for d in os.listdir(crates)
            if os.path.isdir(os.path.join(crates, d, "src"))
        )
    found = sum(check(d, include_tests) for d in dirs)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
