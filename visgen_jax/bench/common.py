"""What every benchmark shares."""

import collections
import glob
import math
import os
import re
import tempfile
import time

import jax


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


# Peak dense FLOP/s of one JAX device, by compute dtype, from the vendors' data sheets; keys are
# matched (in this order) against `device_kind`. TPUs list no float32 peak: XLA runs float32
# matmuls there as bfloat16 MXU passes. GPUs' float32 is the TF32 tensor-core peak, which is what
# JAX's default matmul precision uses for float32 on them.
PEAK_FLOPS_PER_S = (
    ('TPU v4', {'bfloat16': 275e12}),
    ('TPU v5 lite', {'bfloat16': 197e12}),  # v5e
    ('TPU v5e', {'bfloat16': 197e12}),
    ('TPU v5p', {'bfloat16': 459e12}),
    ('TPU v5', {'bfloat16': 459e12}),  # v5p reports itself as 'TPU v5'
    ('TPU v6 lite', {'bfloat16': 918e12}),  # v6e (Trillium)
    ('TPU v6e', {'bfloat16': 918e12}),
    ('A100', {'bfloat16': 312e12, 'float32': 156e12}),
    ('H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12}),
    ('H100', {'bfloat16': 989e12, 'float32': 495e12}),  # SXM
)


def device_peak(device_kind: str, dtype: str) -> tuple[float | None, str | None]:
  """(peak FLOP/s of one device of this kind in this dtype, None) or (None, why it is unknown)."""
  for key, peaks in PEAK_FLOPS_PER_S:
    if key in device_kind:
      if dtype in peaks:
        return peaks[dtype], None
      return None, f'no {dtype} peak is listed for {device_kind!r} (only {", ".join(peaks)})'
  return None, f'no peak FLOP/s is listed for device kind {device_kind!r}'


def flops_report(jitted, args, seconds: float, dtype: str = 'float32',
                 peak_flops_per_s: float | None = None) -> dict:
  """FLOPs of one call of `jitted(*args)` from XLA's cost analysis, the FLOP/s achieved at
  `seconds` per call, and the MFU against the device's peak for `dtype` (the compute dtype).

  The FLOPs are per device for a program partitioned over several (XLA analyses one device's
  share), and a loop's body is counted once: pass the function of one step, with the seconds of
  one step. `peak_flops_per_s` overrides the table; with neither, MFU is None and 'mfu_note' says
  why (always on CPU).
  """
  device = jax.devices()[0]
  flops = float(jitted.lower(*args).compile().cost_analysis()['flops'])
  if peak_flops_per_s is None:
    peak_flops_per_s, note = device_peak(device.device_kind, dtype)
  else:
    note = None
  achieved = flops / seconds
  return {
      'backend': jax.default_backend(), 'device_kind': device.device_kind, 'dtype': dtype,
      'flops_per_step': flops, 'seconds_per_step': seconds, 'achieved_flops_per_s': achieved,
      'peak_flops_per_s': peak_flops_per_s,
      'mfu': None if peak_flops_per_s is None else achieved / peak_flops_per_s,
      'mfu_note': note,
  }


def trace_event_ms(run, calls: int = 1) -> collections.Counter:
  """{event name: ms per call} of `calls` calls of run() (which must block until done) under the
  JAX profiler, after a warm-up call. XLA's CPU thunks appear under their HLO instruction names,
  with wall times (on a loaded machine they include waiting)."""
  run()
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      for _ in range(calls):
        run()
    trace, = glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True)
    planes = jax.profiler.ProfileData.from_file(trace).planes
  ms = collections.Counter()
  for plane in planes:
    for line in plane.lines:
      for event in line.events:
        ms[event.name] += event.duration_ns / 1e6 / calls
  return ms


def xla_op_profile(jitted, args, calls: int = 3, top: int = 12) -> list[dict]:
  """Where one call of `jitted(*args)` spends its time, from a JAX profiler trace of `calls` calls.

  Each compiled op (a fusion, dot, ...) is named by the source op it came from (its HLO
  metadata), with repeated layers (`name_3`) merged into `name_*`; rows are
  {'op', 'kind', 'ms' per call, 'share' of the ops' total}, the `top` largest. On CPU the
  times are wall times of each op's thunk.
  """
  compiled = jitted.lower(*args).compile()
  source = {}
  for match in re.finditer(r'^\s*(?:ROOT )?%(\S+) = .*?metadata=\{op_name="([^"]*)"',
                           compiled.as_text(), re.MULTILINE):
    source[match.group(1)] = re.sub(r'_\d+(?=[/.]|$)', '_*', match.group(2).split('/', 1)[-1])
  totals = collections.Counter()
  for name, ms in trace_event_ms(lambda: jax.block_until_ready(jitted(*args)), calls).items():
    if name in source or re.fullmatch(r'[\w.-]+\.\d+', name):
      totals[(name.rsplit('.', 1)[0], source.get(name, name))] += ms
  everything = sum(totals.values())
  return [{'op': op, 'kind': kind, 'ms': ms, 'share': ms / everything}
          for (kind, op), ms in totals.most_common(top)]


def torch_op_profile(fn, calls: int = 3, top: int = 12) -> list[dict]:
  """torch's profiler on `calls` calls of fn(): the `top` operators by self CPU time,
  {'op', 'ms' per call, 'share' of the total}."""
  import torch  # pylint: disable=g-import-not-at-top
  fn()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    for _ in range(calls):
      fn()
  rows = sorted(profile.key_averages(), key=lambda row: -row.self_cpu_time_total)
  everything = sum(row.self_cpu_time_total for row in rows)
  return [{'op': row.key, 'ms': row.self_cpu_time_total / calls / 1e3,
           'share': row.self_cpu_time_total / everything} for row in rows[:top]]
