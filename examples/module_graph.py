"""Who imports whom among the crate's modules, and any import circles.

    python3 examples/module_graph.py [REV]      # REV: a commit (default: the working tree)

Reads src/**/*.rs (at REV through `git show` when given), maps each file to its
module (src/engine/kernels/conv.rs -> engine::kernels::conv, a mod.rs to its
folder), and records an edge A -> B when A's code names B by path:
`use super::B`, `super::B::...`, `crate::engine::B`, `use self::B` in a mod.rs.
Tests inside a file (`#[cfg(test)] mod tests`) count as the file. A parent that
only declares and re-exports its children (`pub mod b; pub use b::X`) is not an
import of the child's internals, so edges from a mod.rs to its own children are
left out. Prints one line per module (`A -> B, C`), then the circles found
(strongly connected components of more than one module), then the files over
700 lines of code before their tests.
"""
import re
import subprocess
import sys
from collections import defaultdict


def files(rev):
    if rev:
        out = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "src"], capture_output=True, text=True, check=True).stdout
        for p in out.split():
            if p.endswith(".rs"):
                yield p, subprocess.run(["git", "show", f"{rev}:{p}"], capture_output=True, text=True, check=True).stdout
    else:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "src"], capture_output=True, text=True, check=True).stdout
        for p in out.split():
            if p.endswith(".rs"):
                with open(p, encoding="utf-8") as f:
                    yield p, f.read()


def module_of(path):
    parts = path[len("src/"):-len(".rs")].split("/")
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return "::".join(parts) or "crate"


def main():
    rev = sys.argv[1] if len(sys.argv) > 1 else None
    sources = dict(files(rev))
    mods = {module_of(p): text for p, text in sources.items()}
    edges = defaultdict(set)
    for m, text in mods.items():
        parent = m.rsplit("::", 1)[0] if "::" in m else "crate"
        is_dir_mod = any(p.endswith("/mod.rs") and module_of(p) == m for p in sources)
        base = m if is_dir_mod else parent
        code = re.sub(r"//[^\n]*", "", text)
        for name in re.findall(r"\bsuper::(\w+)", code):
            target = f"{parent}::{name}" if parent != "crate" else name
            if not is_dir_mod and target in mods:
                edges[m].add(target)
            elif is_dir_mod:
                grand = parent.rsplit("::", 1)[0] if "::" in parent else "crate"
                t2 = f"{parent}::{name}" if parent != "crate" else name
                if t2 in mods and t2 != m:
                    edges[m].add(t2)
        for path in re.findall(r"\bcrate::((?:\w+::)*\w+)", code):
            segs = path.split("::")
            for k in range(len(segs), 0, -1):
                t = "::".join(segs[:k])
                if t in mods:
                    if t != m and not t.startswith(m + "::"):
                        edges[m].add(t)
                    break
        if is_dir_mod:
            for name in re.findall(r"\bself::(\w+)", code):
                t = f"{m}::{name}"
                if t in mods:
                    pass  # a folder's own children: declaration, not import
        edges[m]  # every module listed
        del base
    for m in sorted(mods):
        print(f"{m} -> {', '.join(sorted(edges[m])) or '-'}")

    # Tarjan's strongly connected components
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
            comps.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(mods):
        if v not in index:
            visit(v)
    circles = [sorted(c) for c in comps if len(c) > 1]
    print("circles:", "none" if not circles else "; ".join(" <-> ".join(c) for c in circles))
    long = []
    for p, text in sorted(sources.items()):
        code = text.split("#[cfg(test)]")[0]
        n = sum(1 for line in code.splitlines() if line.strip() and not line.strip().startswith("//"))
        if n > 700:
            long.append(f"{p} ({n})")
    print("over 700 lines of code:", ", ".join(long) or "none")
    return 1 if circles else 0


if __name__ == "__main__":
    sys.exit(main())
