"""The benchmark result as markdown (the README's table): variants, ceilings, ratios, machine."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from kdlib.bench.concurrent import GAIN_PER_DOUBLING, worth_running
from kdlib.bench.targets import CEILINGS, INFO_RATIOS, TARGETS
from kdlib.bench.variants import VARIANTS


def _fmt(value: float | None, spec: str) -> str:
    return ("n/a" if value is None or (isinstance(value, float) and math.isnan(value))
            else format(value, spec))


def _order(result: dict[str, Any]) -> list[str]:
    """The variants in the order they were run (the JSON file has its keys sorted)."""
    variants = result.get("variants", {})
    order = result.get("settings", {}).get("variant_order") or [v.name for v in VARIANTS]
    return [n for n in order if n in variants] + [n for n in variants if n not in order]


def _switches(info: dict[str, Any]) -> str:
    s = info.get("switches", {})
    parts = [s["precision"]] if "precision" in s else []
    if "channels_last" in s:
        parts.append("channels_last" if s["channels_last"] else "NCHW")
    if "compile" in s:
        parts.append("compiled" if s["compile"] else "eager")
    return ", ".join(parts)


def _ceiling_fractions(v: dict[str, Any]) -> str:
    of = v.get("of_ceiling", {})
    return " / ".join(_fmt(None if of.get(c) is None else 100 * of[c], ".0f") + "%"
                      for c in CEILINGS)


def _variant_rows(result: dict[str, Any]) -> list[str]:
    variants = result.get("variants", {})
    fp32 = variants.get("fp32", {})
    fp32_ms = fp32.get("step_ms") if fp32.get("status") == "ok" else None
    rows = ["| variant | switches | images/s (median) | ms/step | GFLOP/s | of fp32 / bf16 ceiling "
            "| images/s, all windows | step time vs (a) |",
            "|---|---|---:|---:|---:|---:|---|---:|"]
    for name in _order(result):
        v = variants[name]
        label = v.get("label", name)
        if v.get("status") != "ok":
            rows.append(f"| {label} `{name}` | | {v.get('status', 'n/a')} | | | | | |")
            continue
        windows = " ".join(f"{x:.0f}" for x in v.get("images_per_s_windows", []))
        if v.get("same_as"):  # the same run config as an earlier variant: timed once
            windows = f"same step as `{v['same_as']}`"
        rel = "n/a"
        if fp32_ms:
            digits = 2 if v["step_ms"] >= fp32_ms / 10 else 3
            rel = f"{v['step_ms'] / fp32_ms:.{digits}f}×"
        flops = (f"{_fmt(v.get('gflops'), '.1f')} | {_ceiling_fractions(v)}" if "gflops" in v
                 else "— | —")
        rows.append(f"| {label} `{name}` | {_switches(v.get('info', {}))} | "
                    f"{v['images_per_s']:.0f} | "
                    f"{v['step_ms']:.1f} | {flops} | {windows} | {rel} |")
    return rows


def _ratio_value(r: dict[str, Any], value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.0f}%" if r.get("denominator") in CEILINGS else f"{value:.2f}×"


def _ratio_lines(result: dict[str, Any]) -> list[str]:
    ratios = result.get("ratios", {})
    lines = []
    known = [*TARGETS, *INFO_RATIOS]
    for key in [k for k in known if k in ratios] + [k for k in ratios if k not in known]:
        r = ratios[key]
        value = _ratio_value(r, r.get("value"))
        if r.get("target") is None:
            lines.append(f"- {r['what']}: {value} (no target)")
            continue
        verdict = ("not measured" if r.get("met") is None
                   else ("**met**" if r["met"] else "**missed**"))
        target = (f"{100 * r['target']:g}%" if r.get("denominator") in CEILINGS
                  else f"{r['target']:g}×")
        lines.append(f"- {r['what']}: {value} (target {r['op']} {target}) — {verdict}")
    return lines


def _ceiling_line(result: dict[str, Any]) -> list[str]:
    ceilings = result.get("ceilings", {})
    if not ceilings:
        return []
    parts = [f"{c.get('dtype')} {_fmt(c.get('gflops'), '.1f')} GFLOP/s "
             f"({c.get('size')}×{c.get('size')})"
             for c in (ceilings.get(n, {}) for n in CEILINGS) if c]
    return ["- matmul ceilings, timed in the same interleaved windows: " + ", ".join(parts)]


def _optional_line(result: dict[str, Any], key: str, what: str,
                   line: Callable[[dict[str, Any]], str]) -> list[str]:
    """The line of an optional part of the benchmark: none if absent, its error if it failed."""
    entry = result.get(key)
    if not entry:
        return []
    return [f"- {what}: not measured ({_first_line(entry['error'])})" if "error" in entry
            else line(entry)]


def _numeric_order(entries: dict[str, Any]) -> list[tuple[str, Any]]:
    """Entries keyed by a count or bit width, in numeric order (JSON keys are strings, and
    "12" < "4")."""
    return sorted(entries.items(), key=lambda item: int(item[0]))


def _per_count(by_jobs: dict[str, Any]) -> str:
    """"1 × 3834 = 3834 img/s, 2 × ...": processes, each one's mean rate, their sum."""
    return ", ".join(f"{k} × {sum(e['per_process']) / len(e['per_process']):.0f} = "
                     f"{e['images_per_s']:.0f} img/s" for k, e in _numeric_order(by_jobs))


def _concurrency_line(c: dict[str, Any]) -> str:
    return (f"- `{c['variant']}` training processes side by side on one device ({c['seconds']:g} s "
            f"each): {_per_count(c['by_jobs'])}; worth running: {worth_running(c)} at a time "
            f"(twice the processes must add {100 * (GAIN_PER_DOUBLING - 1):.0f}%)")


def _profile_line(p: dict[str, Any]) -> str:
    top = ", ".join(f"{t['name'][:48]} {t['ms_per_step']:.2f} ms" for t in p.get("top", [])[:3])
    if "device_busy_fraction" in p:
        what = (f"the GPU busy {p['device_busy_ms_per_step']:.1f} ms of each "
                f"{p['wall_ms_per_step']:.1f} ms step ({100 * p['device_busy_fraction']:.0f}%), "
                f"{p['kernel_launches_per_step']:.0f} kernel launches a step")
    else:
        what = f"{p['wall_ms_per_step']:.1f} ms a step on the host"
    return (f"- profile of `{p['variant']}` ({p['steps']} steps, torch.profiler): {what}; bound by "
            f"{p['bound']}; most time: {top}")


def _verdict_line(result: dict[str, Any]) -> list[str]:
    from kdlib.bench.compiled import compile_verdict  # lazy: torch.compile's module
    from kdlib.budget import LEASE_TRAINING_MINUTES

    verdict = compile_verdict(result, 60.0 * LEASE_TRAINING_MINUTES)
    if verdict is None:
        return []
    pays = "**pays**" if verdict["pays"] else "does not pay"
    return [f"- torch.compile for a grid of long runs by this benchmark's rule (`paper` compiles, "
            f"decided before its first run): {pays} ({verdict['why']})"]


def _first_line(error: str) -> str:
    """An error's first line (a stack trace would break the markdown list it sits in)."""
    return error.strip().splitlines()[0] if error.strip() else error


def _compiled_line(c: dict[str, Any]) -> str:
    levels, side = c.get("levels", {}), c.get("concurrency", {})
    if "error" in levels:
        exact = f"not checked ({_first_line(levels['error'])})"
    else:
        by_bits = _numeric_order(levels["by_bits"])
        good = [b for b, e in by_bits if e["activation_exact"] and e["weight_exact"]]
        bad = [f"{b} ({', '.join(n for n in ('activation', 'weight') if not e[n + '_exact'])})"
               for b, e in by_bits if b not in good]
        unlike = sum(e["weight_levels_unlike_eager"] for b, e in by_bits if b in good)
        if not bad:
            exact = f"yes at {', '.join(good)} bits"
        else:
            exact = ("**no**: " + (f"exact at {', '.join(good)} bits, " if good else "")
                     + f"**not** at {', '.join(bad)} bits")
        exact += f" ({unlike} weights on another level than eager's, both exact)" if unlike else ""
    if "error" in side:
        speed = f"not measured ({_first_line(side['error'])})"
    else:
        speed = ", ".join(
            f"{k} at once: {e['images_per_s']:.0f} img/s"
            + (f" ({e['ready_s']:.0f} s to compile)" if "ready_s" in e else "")
            for k, e in _numeric_order(side["by_jobs"]))
    graphs = _cudagraphs_text(c.get("cudagraphs"))  # measured since 2026-12-04
    return (f"- torch.compile for a grid's runs: every quantizer level exact {exact}; compiled "
            f"`{side.get('variant', 'kd_w4_compile')}` processes side by side, {speed}{graphs}")


def _graphs_line(g: dict[str, Any]) -> str:
    check, side = g.get("check", {}), g.get("concurrency", {})
    if "error" in check:
        same = f"not checked ({_first_line(check['error'])})"
    elif check.get("equal"):
        same = f"yes ({check['steps']} KD 4-bit steps, deterministic cuDNN)"
    else:
        same = (f"**no** (weights up to {check['max_abs_diff']:.3g} apart after {check['steps']} "
                f"steps; eager repeats itself: {'yes' if check.get('eager_repeatable') else 'no'})")
    if "error" in side:
        speed = f"not measured ({_first_line(side['error'])})"
    else:
        speed = _per_count(side["by_jobs"])
    return (f"- fit()'s step replayed as a CUDA graph (`cuda_graphs`, `kdlib.step.GraphedStep`): "
            f"the same bits as eager steps {same}; `{side.get('variant', 'kd_w4_graphs')}` "
            f"processes side by side: {speed}")


def _graphs_verdict_line(result: dict[str, Any]) -> list[str]:
    from kdlib.bench.graphs import graphs_verdict

    verdict = graphs_verdict(result)
    if verdict is None:
        return []
    use = "**replay**" if verdict["use"] else "stay eager"
    return [f"- CUDA graphs for a grid's runs (`lease go` sets `cuda_graphs`): {use} "
            f"({verdict['why']})"]


def _cudagraphs_text(entry: dict[str, Any] | None) -> str:
    """The compiled step replayed as CUDA graphs: "; ... one process: N img/s", its error, or
    "" where not measured."""
    if entry is None:
        return ""
    if "error" in entry:
        return f"; replayed as CUDA graphs, not measured ({_first_line(entry['error'])})"
    one = entry["by_jobs"]["1"]
    skips = one.get("cudagraph_skips")
    skipped = "" if not skips else f" ({skips} compiled graph(s) ran without CUDA graphs)"
    return (f"; replayed as CUDA graphs (`{entry['variant']}`, reduce-overhead), one process: "
            f"{one['images_per_s']:.0f} img/s{skipped}")


def _grouped_line(g: dict[str, Any]) -> str:
    check, steps, ops = g.get("check", {}), g.get("steps", {}), g.get("ops_per_step", {})
    if "error" in check:
        exact = f"not checked ({_first_line(check['error'])})"
    else:
        by_bits = _numeric_order(check["by_bits"])
        bad = [b for b, e in by_bits if not (e["values"] and e["gradients"])]
        bits = ", ".join(b for b, _ in by_bits)
        exact = (f"yes at {bits} bits" if not bad
                 else f"**no** at {', '.join(bad)} bits (of {bits})")
    grouped, single = steps.get("kd_w4", {}), steps.get("kd_w4_per_layer", {})
    if "error" in steps:
        speed = f"not timed ({_first_line(steps['error'])})"
    elif grouped.get("status") == "ok" and single.get("status") == "ok":
        speed = (f"fit()'s KD 4-bit step {grouped['images_per_s']:.0f} img/s, per layer "
                 f"{single['images_per_s']:.0f} ({single['step_ms'] / grouped['step_ms']:.2f}×)")
    else:
        speed = ("not timed ("
                 + _first_line(grouped.get("error") or single.get("error") or "?") + ")")
    count = (f"; operators dispatched a step {ops['kd_w4']} vs {ops['kd_w4_per_layer']}"
             if {"kd_w4", "kd_w4_per_layer"} <= set(ops) else "")
    return (f"- DoReFa weights of all layers quantized together (`kdlib.quant.grouped`): bit "
            f"for bit as per layer, values and gradients, {exact}; {speed}{count}")


def _machine_line(result: dict[str, Any]) -> str:
    m, s = result.get("machine", {}), result.get("settings", {})
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    bf16 = {True: ", native bf16", False: ", no native bf16"}.get(m.get("cpu_bf16_native"), "")
    load = result.get("load_average_start")
    load_txt = f"; load average {load[0]:.2f} at start" if load else ""
    preset = f" (the `{s['preset']}` preset's config)" if s.get("preset") else ""
    return (f"Measured on host `{m.get('host')}`: {m.get('cpu_model')}, {m.get('cores')} cores "
            f"({m.get('threads')} torch threads{bf16}){gpu}, device {m.get('device')}, torch "
            f"{m.get('torch')}, {result.get('date', '?')}{load_txt}. Batch "
            f"{s.get('batch_size')}{preset}, median of {s.get('windows')} windows × "
            f"{s.get('steps')} steps after {s.get('warmup')} warm-up steps, interleaved across "
            f"variants, on {s.get('data')}; "
            "data loading included in every variant. `make bench` reproduces it.")


def render_markdown(result: dict[str, Any]) -> str:
    """The benchmark as markdown: table of variants, ceilings, ratios with targets (met or
    missed), machine and settings."""
    return "\n".join([*_variant_rows(result), "", *_ceiling_line(result), *_ratio_lines(result),
                      *_optional_line(result, "concurrency", "runs side by side",
                                      _concurrency_line),
                      *_optional_line(result, "grouped", "weights quantized together",
                                      _grouped_line),
                      *_optional_line(result, "graphs", "replayed steps", _graphs_line),
                      *_optional_line(result.get("graphs") or {}, "profile",
                                      "profile of the replayed step", _profile_line),
                      *_graphs_verdict_line(result),
                      *_optional_line(result, "compiled", "compiled runs", _compiled_line),
                      *_verdict_line(result),
                      *_optional_line(result, "profile", "profile", _profile_line), "",
                      _machine_line(result)])
