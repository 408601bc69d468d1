#!/usr/bin/env python3
"""The longest Rust functions under the given paths (default: crates), by lines from `fn` to
its closing brace, tests included.

    scripts/longest-functions.py [--top N] [--no-tests] [path ...]
"""
import argparse
import pathlib
import re


def blank(text):
    """Replaces comments, strings and char literals by spaces, keeping line breaks."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i)); i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j])); i = j
        elif (m := re.match(r'b?r(#*)"', text[i:i + 260])) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append(re.sub(r"[^\n]", " ", text[i:j])); i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i:j + 1])); i = j + 1
        elif c == "'" and (m := re.match(r"'(\\.|\\u\{[0-9a-fA-F]+\}|[^\\'])'", text[i:i + 12])):
            out.append(" " * m.end()); i += m.end()
        else:
            out.append(c); i += 1
    return "".join(out)


FN = re.compile(r"\bfn\s+([A-Za-z_][A-Za-z_0-9]*)")


def functions(path, skip_tests):
    text = blank(path.read_text())
    if skip_tests:
        k = text.find("#[cfg(test)]")
        text = text if k < 0 else text[:k]
    for m in FN.finditer(text):
        j, depth = m.end(), 0
        while j < len(text) and text[j] not in "{;":
            j += 1
        if j >= len(text) or text[j] == ";":
            continue
        start = j
        while j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                break
            j += 1
        first = text.count("\n", 0, m.start()) + 1
        last = text.count("\n", 0, j) + 1
        yield last - first + 1, f"{path}:{first}", m.group(1)
        del start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--no-tests", action="store_true", help="skip tests/ and #[cfg(test)] modules")
    ap.add_argument("paths", nargs="*", default=["crates"])
    args = ap.parse_args()
    rows = []
    for root in args.paths:
        for p in sorted(pathlib.Path(root).rglob("*.rs")):
            if "target" in p.parts or (args.no_tests and "tests" in p.parts):
                continue
            rows.extend(functions(p, args.no_tests))
    for lines, where, name in sorted(rows, reverse=True)[: args.top]:
        print(f"{lines:5d}  {name:40s} {where}")


if __name__ == "__main__":
    main()
