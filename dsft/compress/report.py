"""compression_report.md and the console summary of `dsft compress`: what was done and what it cost."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def _mib(count: int) -> str:
    return f"{count / 2**20:,.2f} MiB"


def write_report(record: dict, path: Path, console) -> None:
    price = record["report"]
    sizes, load = price["weights_bytes"], price["load"]
    lines = [f"# Compression: {record['method']} ({price['verdict']})", "",
             (f"Settings: {record['settings']}; details: "
             f"{ {k: v for k, v in record['details'].items() if k != 'block_influence'} }"), "",
             "| | uncompressed | compressed |", "|---|---|---|",
             f"| weights on disk | {_mib(sizes['uncompressed'])} | {_mib(sizes['compressed'])} |",
             (f"| peak RSS loading | {load['uncompressed']['load_peak_rss_mib']:,.1f} MiB | "
             f"{load['compressed']['load_peak_rss_mib']:,.1f} MiB |"),
             (f"| parameters (zero) | {load['uncompressed']['parameters']:,} ({load['uncompressed']['zero_parameters']:,})"
             f" | {load['compressed']['parameters']:,} ({load['compressed']['zero_parameters']:,}) |")]
    speed = price.get("speed") or {}
    if speed.get("compressed") and speed.get("uncompressed"):
        key = next(k for k in speed["compressed"] if k.startswith("tokens_per_s"))
        lines.append(f"| {key} | {speed['uncompressed'][key]} | {speed['compressed'][key]} |")
    lines += ["", f"Size ratio {price['size_ratio']:.2f}x."]
    if price["metrics"]:
        lines += ["", f"Metrics on {price['eval']['data']} ({price['eval']['examples']} examples):", "",
                  "| metric | uncompressed | compressed | change interval | verdict |", "|---|---|---|---|---|"]
        for v in price["metrics"]:
            span = (f"[{v['interval_percent'][0]:+.2f}%, {v['interval_percent'][1]:+.2f}%]"
                    if v["interval_percent"] else "-")
            lines.append(f"| {v['name']} | {v['baseline']:.4g} | {v['candidate']:.4g} | {span} | "
                         f"{'pass' if v['passed'] else 'FAIL'}: {v['why']} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    table = Table("metric", "uncompressed", "compressed", "verdict", title=f"{record['method']}: {price['verdict']}")
    table.add_row("weights", _mib(sizes["uncompressed"]), _mib(sizes["compressed"]), f"{price['size_ratio']:.2f}x")
    for v in price["metrics"]:
        table.add_row(v["name"], f"{v['baseline']:.4g}", f"{v['candidate']:.4g}", v["why"])
    console.print(table)
