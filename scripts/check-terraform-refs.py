#!/usr/bin/env python3
"""Offline structural check of a Terraform module, for modules whose provider cannot be had
here (no registry access), so `terraform validate` cannot run on them.

What it checks, with python-hcl2 (a second HCL parser besides `terraform fmt`):
  - every *.tf file of the directory parses;
  - every `var.X`, `local.X`, `data.T.N` and resource reference `T.N` names something the module
    declares; every declared variable is used; variables have a description and a type; outputs
    have a description;
  - every resource and data source type belongs to a provider in `required_providers`;
  - every `file("${path.module}/...")` names an existing file.
What it cannot check: attribute names, types and required arguments of resources (that needs
the provider's schema, i.e. `terraform validate` with the provider installed).

Usage: check-terraform-refs.py DIR   (exit 0: fine, 1: problems listed on stderr)
Run by xtask/tests/deploy_templates.rs with the interpreter of .tools/venv (scripts/bootstrap.sh).
"""

import json
import pathlib
import re
import sys

import hcl2


def unquote(key):
    return key.strip('"')


def strip_comments(value):
    if isinstance(value, dict):
        return {k: strip_comments(v) for k, v in value.items() if k != "__comments__"}
    if isinstance(value, list):
        return [strip_comments(v) for v in value]
    return value


def main(directory):
    root = pathlib.Path(directory)
    files = sorted(root.glob("*.tf"))
    problems = []
    if not files:
        problems.append(f"{root}: no .tf files")
    variables, locals_, outputs, resources, data = {}, set(), {}, set(), set()
    providers = set()
    bodies = []
    for path in files:
        try:
            with open(path) as f:
                doc = strip_comments(hcl2.load(f))
        except Exception as e:  # the parser's own error types vary by version
            problems.append(f"{path}: does not parse: {e}")
            continue
        for block in doc.get("terraform", []):
            for req in block.get("required_providers", []):
                providers.update(unquote(k) for k in req if not k.startswith("__"))
        for block in doc.get("variable", []):
            for name, body in block.items():
                variables[unquote(name)] = body
        for block in doc.get("locals", []):
            locals_.update(k for k in block if not k.startswith("__"))
        for block in doc.get("output", []):
            for name, body in block.items():
                outputs[unquote(name)] = body
        for kind, target in (("resource", resources), ("data", data)):
            for block in doc.get(kind, []):
                for rtype, named in block.items():
                    for name in named:
                        if not name.startswith("__"):
                            target.add((unquote(rtype), unquote(name)))
        # Everything but the variable declarations themselves is searched for references.
        bodies.append(json.dumps({k: v for k, v in doc.items() if k != "variable"}))
        bodies.append(json.dumps([b for b in doc.get("variable", [])]))

    text = "\n".join(bodies)
    used_vars = set(re.findall(r"\bvar\.([A-Za-z_][A-Za-z0-9_-]*)", text))
    for v in sorted(used_vars - variables.keys()):
        problems.append(f"var.{v} is used but not declared")
    for v in sorted(variables.keys() - used_vars):
        problems.append(f"variable {v} is declared but never used")
    for name, body in variables.items():
        for field in ("description", "type"):
            if field not in body:
                problems.append(f"variable {name} has no {field}")
    for name, body in outputs.items():
        if "description" not in body:
            problems.append(f"output {name} has no description")
    for v in sorted(set(re.findall(r"\blocal\.([A-Za-z_][A-Za-z0-9_-]*)", text)) - locals_):
        problems.append(f"local.{v} is used but not declared")
    for t, n in sorted(set(re.findall(r"\bdata\.([a-z0-9_]+)\.([A-Za-z_][A-Za-z0-9_-]*)", text))):
        if (t, n) not in data:
            problems.append(f"data.{t}.{n} is used but not declared")
    prefixes = tuple(f"{p}_" for p in providers)
    for t, n in sorted(set(re.findall(r"(?<![.\w])([a-z][a-z0-9]*_[a-z0-9_]+)\.([A-Za-z_][A-Za-z0-9_-]*)", text))):
        if t.startswith(prefixes) and (t, n) not in resources:
            problems.append(f"{t}.{n} is used but not declared")
    for t, n in sorted(resources | data):
        if not t.startswith(prefixes):
            problems.append(f"{t}.{n}: type of no provider in required_providers {sorted(providers)}")
    for rel in re.findall(r'file\(\\"\$\{path\.module\}/([^"\\]+)\\"\)', text):
        if not (root / rel).is_file():
            problems.append(f'file("${{path.module}}/{rel}"): no such file')

    for p in problems:
        print(f"{root}: {p}", file=sys.stderr)
    print(
        f"{root}: {len(files)} files, {len(variables)} variables, {len(resources)} resources, "
        f"{len(data)} data sources, {len(outputs)} outputs, {len(problems)} problems"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
