"""python -m visgen_jax.bench NAME: runs visgen_jax.bench.NAME.run() and prints its JSON last."""

import importlib
import importlib.util
import json
import pkgutil
import re
import sys

import visgen_jax.bench


def bench_names() -> list[str]:
  """The modules of visgen_jax.bench that define run() (the others are their shared helpers)."""
  names = []
  for module in pkgutil.iter_modules(visgen_jax.bench.__path__):
    with open(importlib.util.find_spec(f'visgen_jax.bench.{module.name}').origin) as source:
      if re.search(r'^def run\(', source.read(), re.MULTILINE):
        names.append(module.name)
  return sorted(names)


def main(argv):
  names = bench_names()
  if len(argv) != 2 or argv[1] not in names:
    print(f'usage: python -m visgen_jax.bench NAME, NAME one of: {", ".join(names)}', file=sys.stderr)
    return 2
  result = importlib.import_module(f'visgen_jax.bench.{argv[1]}').run()
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
