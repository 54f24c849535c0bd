"""evals/bench_scale.py's verdicts: each measurement beside its prediction, with its target (met or missed)."""
from __future__ import annotations

from typing import Any

GIB = 1 << 30
BANDWIDTH = 28e9  # bytes/s this machine's memory reads (the decode bound: every weight byte once per token)
BYTES, ESTIMATE = 0.05, 0.15  # relative tolerances: byte counts, labelled estimates
DISK_SLACK = 1.01  # the disk sample counts 4 KiB blocks and the HF cache's small files beside the shards


def _row(name: str, measured: float | None, predicted: float | None, target: str, met: bool | None,
         unit: str = "B") -> dict[str, Any]:
    ratio = measured / predicted if measured is not None and predicted else None
    return {"check": name, "measured": measured, "predicted": predicted, "ratio": ratio, "unit": unit,
            "target": target, "met": met}


def _within(measured: float | None, predicted: float | None, tolerance: float) -> bool | None:
    if measured is None or not predicted:
        return None
    return abs(measured / predicted - 1) <= tolerance


def _load_rows(part: dict, disk_extra: int = 0, layout_copy: int = 0) -> list[dict]:
    """Rows shared by the CPU load and the offloaded load."""
    load, plan, download = part["load"], part["plan"], part["download_plan"]
    cpu = plan["weight_bytes"].get("cpu", 0)
    anon_plan = download.get("peak_anonymous_bytes", cpu)
    # after the load, the first pass writes the disk layers' CPU-layout copy beside the offload folder's files
    disk_plan = max(download["peak_disk_bytes"] + disk_extra, disk_extra + layout_copy)
    rows = [_row("weights on cpu (after-load layout)", load["model_bytes"], cpu, "within 5%",
                 _within(load["model_bytes"], cpu, BYTES)),
            _row("peak RssAnon of the load, above post-import, vs NF4 model + 1.5 GiB", load["peak_anon"],
                 load["model_bytes"] + 1.5 * GIB, "<= NF4 model + 1.5 GiB",
                 load["peak_anon"] <= load["model_bytes"] + 1.5 * GIB),
            _row("peak RssAnon of the load vs plan's peak anonymous (weights kept in RAM + quantizer chunks)",
                 load["peak_anon"], anon_plan,
                 "within 5%", _within(load["peak_anon"], anon_plan, BYTES)),
            _row("peak extra disk (HF cache + scratch" + (" + offload)" if disk_extra else ")"), part["peak_disk"],
                 disk_plan, "<= the two largest neighbouring shards" + (" + offload" if disk_extra else "") +
                 (" (or offload + its CPU-layout copy)" if layout_copy else "") +
                 " (+1%: blocks, small files)", part["peak_disk"] <= DISK_SLACK * disk_plan),
            _row("peak extra disk: prediction accuracy", part["peak_disk"], disk_plan, "within 5%",
                 _within(part["peak_disk"], disk_plan, BYTES))]
    host = download.get("peak_host_bytes")
    if host and "VmHWM" in load:
        hwm = load["VmHWM"] - part["base"]["VmRSS"]
        # a bound, not an estimate: the kernel reclaims the mapped shard's file pages under memory pressure, so
        # how many stay resident depends on the RAM left beside the model (all of them on a roomy machine)
        rows.append(_row("VmHWM above post-import vs plan's peak host RAM (anonymous + the mapped shard)", hwm,
                         host, "<= plan (file pages are reclaimable)", hwm <= host))
    rows.append(_row("load throughput", load["mparams_per_s"], None, "report", None, "Mparam/s"))
    rows.append(_row("load wall time", load["seconds"], None, "report", None, "s"))
    return rows


def scoring_plan(shape: str, cpu_limit: str | int, window: int, batch: int) -> Any:
    """The plan for perplexity (`all_logits`: every position of a window scored), at the window and micro-batch
    the benchmark scores with; the load's own plan may be for generation."""
    import qopt

    return qopt.plan(shape, 4, {"cpu": cpu_limit}, context=window, batch=batch, all_logits=True)


def streamed_pass_bytes(plan: Any) -> int:
    """What a layer-streamed pass adds to host RAM beside the loaded weights, by the plan's terms: activations,
    the CPU layers' kernel layout (built at their first forward), the disk layers read ahead and the one
    computing."""
    disk = sum(1 for name, dev in plan.device_map.items() if dev == "disk" and ".layers." in name)
    layer = plan.weight_bytes.get("disk", 0) // disk if disk else 0
    return plan.activation_bytes + plan.cpu_layout_bytes + plan.read_buffer_bytes.get("cpu", 0) + layer


def _absmax_saving(shape: str, placement: list[str]) -> int:
    """After the first pass the disk layers are read in the CPU kernel's layout, kept beside their files: the
    same 4-bit weights with a bf16 absmax instead of the fp32 one (2 fewer bytes per 64 weights)."""
    from qopt.place.plan import config_for

    config = config_for(shape)[0]
    disk = next((p for p in placement if p.startswith("disk: layers ")), "")
    first, _, last = disk.removeprefix("disk: layers ").partition("-")
    layers = int(last or first) - int(first) + 1 if first else 0
    linear = 4 * config.hidden_size ** 2 + 2 * config.hidden_size * config.ffn_dim
    return layers * linear // 64 * 2


def summarize(result: dict) -> list[dict]:
    rows: list[dict] = []
    part = result.get("load")
    if part and "load" in part:
        rows += _load_rows(part)
        rows += [_row(f"{step} failed: {part[step]['error']}", None, None, "no error", False, "")
                 for step in ("generate", "perplexity", "save") if "error" in part.get(step, {})]
        decode = part.get("generate") or result.get("reload", {}).get("generate")
        if decode and "error" not in decode:
            bound = part["load"]["model_bytes"] / BANDWIDTH
            rows.append(_row("decode s/token at batch 1 vs bandwidth bound (weights / 28 GB/s)",
                             decode["s_per_token"], bound, "report (ratio to the bound)", None, "s"))
            repack = decode["repack_s"]
            if "generate" not in part and "forward_s" in result.get("reload", {}):  # decoded on the reloaded model
                repack = result["reload"]["forward_s"] - decode["second_forward_s"]
            rows.append(_row("first forward's 4-bit CPU repack (first forward - second)", repack, None, "report",
                             None, "s"))
        ppl = part.get("perplexity") or result.get("reload", {}).get("perplexity")
        if ppl and "error" not in ppl:
            rows.append(_row(f"perplexity, {ppl['windows']} x {ppl['window']} tokens (random weights: ~vocab size)",
                             ppl["perplexity"], None, "finite", ppl["perplexity"] == ppl["perplexity"], ""))
            act = scoring_plan(result["shape"], "1TiB", ppl["window"], 1).activation_bytes
            rows.append(_row("activations during perplexity (extra RssAnon) vs plan for scoring (estimate)",
                             ppl["extra_anon"], act, "within 15% (estimate)",
                             _within(ppl["extra_anon"], act, ESTIMATE)))
    elif part:
        rows.append(_row("load", None, None, "no OOM", False, part.get("failed", "")))
    if "reload" in result and "load_s" in result["reload"]:
        read = result["cold_read"]["seconds"]
        rows.append(_row("cold reload alone vs 1.5 x sequential 16 MiB read", result["reload"]["load_s"],
                         1.5 * read, "report", None, "s"))
    if "reload" in result and "seconds" in result.get("reload", {}):
        read = result["cold_read"]["seconds"]
        rows.append(_row("cold reload + one forward vs 1.5 x sequential 16 MiB read", result["reload"]["seconds"],
                         1.5 * read, "<= 1.5 x read", result["reload"]["seconds"] <= 1.5 * read, "s"))
    if result.get("reload", {}).get("failed"):
        rows.append(_row(f"cold reload + one forward: {result['reload']['failed']}", None, None, "no OOM", False, ""))
    if result.get("not_run"):
        rows.append(_row("not run (see not_run)", None, None, "ran", False, ""))
    off = result.get("offload")
    if off and "load" in off:
        plan = off["plan"]
        disk = plan["weight_bytes"].get("disk", 0)
        rows.append(_row(f"plan verdict: {plan['verdict']}", None, None, "needs disk", plan["verdict"].startswith(
            "needs disk"), ""))
        rows.append(_row("load's map equals the plan's", None, None, "equal", off["load"]["same_map_as_plan"], ""))
        rows += _load_rows(off, disk, disk - _absmax_saving(result["shape"], off["load"]["placement"]))
        rows.append(_row("offload folder", off["load"]["offload_bytes"], disk, "within 5%",
                         _within(off["load"]["offload_bytes"], disk, BYTES)))
        rows += [_row(f"{step} failed: {off[step]['error']}", None, None, "no error", False, "")
                 for step in ("perplexity", "generate_many") if "error" in off[step]]
        streaming = off["perplexity"].get("streaming", {})
        rows.append(_row("layer-streamed perplexity: bytes read (each offloaded byte once)",
                         streaming.get("bytes_read"), disk, "== offloaded bytes",
                         streaming.get("bytes_read") == streaming.get("offloaded_bytes"), "B"))
        gen = off["generate_many"]
        if "error" in gen:
            return rows
        packed = disk - _absmax_saving(result["shape"], off["load"]["placement"])
        rows.append(_row("generate_many 8 x 8: bytes read per decode step (the offload folder's CPU layout copy)",
                         gen["bytes_read_per_step"], packed, "within 5%",
                         _within(gen["bytes_read_per_step"], packed, BYTES)))
        from qopt.evaluation.streamed import default_micro_batch

        ppl = off["perplexity"]
        act = streamed_pass_bytes(scoring_plan(result["shape"], off["cpu_limit"], ppl["window"],
                                               min(ppl["windows"], default_micro_batch(ppl["window"]))))
        rows.append(_row("layer-streamed perplexity's extra RssAnon vs plan: activations + CPU layout + disk layers "
                         "in flight (estimate)", ppl.get("extra_anon"), act, "within 15% (estimate)",
                         _within(ppl["extra_anon"], act, ESTIMATE)))
    elif off:
        rows.append(_row("offloaded load", None, None, "no OOM", False, off.get("failed", "")))
    return rows


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "B":
        return f"{value / GIB:.2f} GiB"
    return f"{value:.3g} {unit}".strip()


def table(results: dict) -> str:
    lines = ["| shape | check | measured | predicted | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for key in ("30b", "66b"):
        result = results.get(key)
        if not result:
            continue
        for row in result.get("checks", []) or summarize(result):
            met = {True: "yes", False: "NO", None: "-"}[row["met"]]
            ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
            lines.append(f"| {result['shape']} | {row['check']} | {_fmt(row['measured'], row['unit'])} | "
                         f"{_fmt(row['predicted'], row['unit'])} | {ratio} | {row['target']} | {met} |")
    return "\n".join(lines)
