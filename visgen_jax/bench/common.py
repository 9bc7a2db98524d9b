"""What every benchmark shares."""

import math
import time


def best_time(fn, repeats: int = 3) -> float:
  """Minimum wall time of fn() (which must block until done) over `repeats` calls, after a warm-up.

  The minimum, not the mean: on a shared machine other work only ever adds time.
  """
  fn()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best
