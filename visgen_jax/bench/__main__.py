"""python -m visgen_jax.bench NAME: runs visgen_jax.bench.NAME.run() and prints its JSON last."""

import importlib
import json
import pkgutil
import sys

import visgen_jax.bench


def main(argv):
  names = sorted(m.name for m in pkgutil.iter_modules(visgen_jax.bench.__path__) if m.name != '__main__')
  if len(argv) != 2 or argv[1] not in names:
    print(f'usage: python -m visgen_jax.bench NAME, NAME one of: {", ".join(names)}', file=sys.stderr)
    return 2
  result = importlib.import_module(f'visgen_jax.bench.{argv[1]}').run()
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
