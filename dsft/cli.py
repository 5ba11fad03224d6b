"""The dsft command line: verbs only, each calls one function. Heavy imports happen inside verbs."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="dsft",
    help="Fine-tune DeepSeek models (and any Hugging Face causal LM) from one YAML file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or check run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Prepare and inspect data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

registry_app = typer.Typer(help="Register, promote and retire model versions (MLflow's model registry).",
                            no_args_is_help=True)
app.add_typer(registry_app, name="registry")

SetOption = Annotated[
    list[str], typer.Option("--set", help="Override a config key: --set train.learning_rate=1e-4 (repeatable).")
]
MaxNewTokens = Annotated[int, typer.Option(help="Longest reply in tokens.")]
Sample = Annotated[bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature (with --sample).")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass (with --sample).")]
TopK = Annotated[int, typer.Option(help="Sample among the k likeliest tokens; 0 turns it off (with --sample).")]
Seed = Annotated[int, typer.Option(help="Random seed for sampling.")]
System = Annotated[str | None, typer.Option(help="System prompt.")]
Thinking = Annotated[str | None, typer.Option(help="Thinking mode: auto, on or off (V3.1/V3.2 hybrid thinking); default: the run's data.thinking.")]


def _decode(max_new_tokens: int, sample: bool, temperature: float, top_p: float, top_k: int):
    from dsft.models.generate import DecodeSettings

    return DecodeSettings(max_new_tokens, sample, temperature, top_p, top_k)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run config YAML.")],
    set_: SetOption = [],
    resume: Annotated[bool, typer.Option(help="Continue the run in output.dir from its newest checkpoint.")] = False,
    nproc: Annotated[int, typer.Option(help="Training processes on this machine, one per GPU (train.distributed says how they share the work).")] = 1,
    nnodes: Annotated[int, typer.Option(help="Machines in the job (run the same command on each).")] = 1,
    node_rank: Annotated[int, typer.Option(help="This machine's index, 0 .. nnodes-1.")] = 0,
    master_addr: Annotated[str, typer.Option(help="Address of the node with node-rank 0.")] = "127.0.0.1",
    master_port: Annotated[int, typer.Option(help="Free TCP port on that node.")] = 29500,
) -> None:
    """Fine-tune a model as CONFIG says and write the run directory."""
    from dsft.config import load_config
    from dsft.train.launch import Topology, launch

    overrides = "".join(f" --set {shlex.quote(item)}" for item in set_)
    topology = Topology(nproc, nnodes, node_rank, master_addr, master_port)
    launch_flags = f" --nproc {nproc}" + (f" --nnodes {nnodes} --node-rank {node_rank} --master-addr {master_addr} "
                                           f"--master-port {master_port}" if nnodes > 1 else "")
    resume_command = f"dsft train {shlex.quote(str(config))}{overrides}{launch_flags if topology.launches else ''} --resume"
    run_config = load_config(config, set_)  # checked before any process starts
    if topology.launches:
        worker_args = ["train", str(config), *(a for item in set_ for a in ("--set", item)), *(["--resume"] if resume else [])]
        launch(topology, worker_args, [c.stage for c in run_config.stage_configs or [run_config]])
        return
    from dsft.train.distributed import init_worker

    init_worker()
    if run_config.stages:
        from dsft.train.stages import run_stages

        run_stages(run_config, _stage, resume=resume, resume_command=resume_command)
        return
    _stage(run_config)(run_config, resume=resume, resume_command=resume_command)


STAGES = {
    "causal_lm": "dsft.train.sft:run_sft",
    "classification": "dsft.train.classify:run_classify",
    "multitask": "dsft.train.multitask:run_multitask",
    "token_classification": "dsft.train.token_classify:run_token_classify",
    "reward": "dsft.train.reward:run_reward",
    "dpo": "dsft.train.dpo:run_dpo",
    "kto": "dsft.train.kto:run_kto",
    "grpo": "dsft.train.grpo:run_grpo",
    "ppo": "dsft.train.ppo:run_ppo",
}
"""task (for stage sft) or stage -> "module:function" that trains it, called as f(config, resume=, resume_command=)."""


def _stage(config):
    """The training function of a run config (imported on use: dsft --help loads no torch)."""
    import importlib

    from dsft.errors import DsftError

    key = config.task if config.stage == "sft" else config.stage
    if key not in STAGES:
        raise DsftError(f"{key} cannot be trained by this version of dsft; it trains: {', '.join(STAGES)}")
    module_name, function_name = STAGES[key].split(":")
    return getattr(importlib.import_module(module_name), function_name)


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run directory of a classification or token_classification run.")],
    input_file: Annotated[Path, typer.Option("--input", help="Records to classify (jsonl, json, csv, parquet); never modified.")],
    output_file: Annotated[Path, typer.Option("--output", help="jsonl written: each input record plus prediction and scores (tags and entities for token_classification).")],
) -> None:
    """Label each record of a file with a classification run's model."""
    from dsft.serve.predict import predict_file

    predict_file(run, input_file, output_file)


@app.command("eval")
def eval_(
    target: Annotated[str, typer.Argument(help="Run directory, or a Hugging Face model (local dir or hub id).")],
    data: Annotated[Path, typer.Option(help="Test data in any dsft format; reference answers are optional.")],
    against: Annotated[str | None, typer.Option(help="A second run or model, compared on the same prompts.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory; default RUN/eval or ./eval-NAME.")] = None,
    set_: SetOption = [],
) -> None:
    """Score a model on test data (metrics, confidence intervals, speed), optionally against another."""
    from dsft.eval.evaluate import run_eval

    run_eval(target, str(data), against, str(out) if out else None, set_)


@app.command()
def generate(
    run: Annotated[Path, typer.Argument(help="Run directory, or a Hugging Face model directory (dsft export or compress output).")],
    prompt: Annotated[str, typer.Option(help="The user message.")],
    system: System = None,
    max_new_tokens: MaxNewTokens = 256,
    sample: Sample = False,
    temperature: Temperature = 0.7,
    top_p: TopP = 0.95,
    top_k: TopK = 0,
    seed: Seed = 0,
    thinking: Thinking = None,
) -> None:
    """Answer one prompt with a run's model, rendered exactly as in training."""
    from dsft.serve.chat import generate_once

    generate_once(run, prompt, system, _decode(max_new_tokens, sample, temperature, top_p, top_k), seed, thinking)


@app.command()
def chat(
    run: Annotated[Path, typer.Argument(help="Run directory, or a Hugging Face model directory (dsft export or compress output).")],
    system: System = None,
    max_new_tokens: MaxNewTokens = 256,
    sample: Sample = False,
    temperature: Temperature = 0.7,
    top_p: TopP = 0.95,
    top_k: TopK = 0,
    seed: Seed = 0,
    thinking: Thinking = None,
) -> None:
    """Talk with a run's model; replies stream as they are generated (/reset, /exit)."""
    from dsft.serve.chat import chat_loop

    chat_loop(run, system, _decode(max_new_tokens, sample, temperature, top_p, top_k), seed, thinking=thinking)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run directory written by dsft train.")],
    out: Annotated[Path, typer.Option(help="New directory for the Hugging Face model (outside the run).")],
    merge: Annotated[bool, typer.Option(help="Merge a LoRA adapter into its base, tensor by tensor; else keep it separate.")] = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest weight file written, e.g. 2GB, 500MB, 1GiB.")] = "2GB",
    dtype: Annotated[str, typer.Option(help="keep, float32, bfloat16 or float16 for the floating weights.")] = "keep",
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists and is not empty.")] = False,
) -> None:
    """Write a run as a plain Hugging Face model directory (safetensors, config, tokenizer)."""
    from dsft.export.export import export_run

    export_run(run, out, merge, max_shard_size, dtype, overwrite)


@app.command()
def compress(
    target: Annotated[str, typer.Argument(help="Run directory (a LoRA run is merged first) or Hugging Face model directory.")],
    method: Annotated[str, typer.Option(help="int8-dynamic, int8-weight, int4-weight, prune-magnitude, prune-layers or prune-experts.")],
    out: Annotated[Path, typer.Option(help="New directory for the compressed Hugging Face model.")],
    calibration: Annotated[Path | None, typer.Option(help="Calibration data (any dsft format); default: the run's first training file.")] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help="Test data: every dsft eval metric, compressed against uncompressed.")] = None,
    max_drop: Annotated[str | None, typer.Option(help="Fail (exit 1) when a metric drops more than this, e.g. 2% (needs --eval).")] = None,
    set_: SetOption = None,
) -> None:
    """Compress a model and measure what it cost: size, memory, speed and accuracy on your data."""
    from dsft.compress.compress import run_compress
    from dsft.lifecycle.gate import parse_percent

    overrides = [*(set_ or []), *([f"compress.max_drop_percent={parse_percent(max_drop, '--max-drop')}"] if max_drop else [])]
    raise typer.Exit(run_compress(target, method, str(out), str(calibration) if calibration else None,
                                  str(eval_data) if eval_data else None, overrides))


@app.command()
def serve(
    run: Annotated[str, typer.Argument(help="Run directory, or a Hugging Face model directory (e.g. dsft export output).")],
    config: Annotated[Path | None, typer.Option(help="Serve config YAML (a serve: section); default: built-in settings.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (same as --set serve.port=N); default 8000.", min=0, max=65535)] = None,
    set_: SetOption = [],
) -> None:
    """Serve a model with the OpenAI API (chat, completions, streaming), batching concurrent requests."""
    from dsft.serve.server import run_server

    run_server(run, config, set_, port)


@data_app.command("prepare")
def data_prepare(
    config: Annotated[Path, typer.Argument(help="Data preparation config YAML.")],
    set_: SetOption = [],
) -> None:
    """Clean, filter, deduplicate, mask, split and version raw data, with a report."""
    from dsft.config import load_yaml_model
    from dsft.data.prepare import run_prepare
    from dsft.data.prepare_config import PrepareConfig

    run_prepare(load_yaml_model(config, PrepareConfig, set_))


@data_app.command("inspect")
def data_inspect(
    file: Annotated[Path, typer.Argument(help="A data file (jsonl, json, csv, parquet) or datasets directory.")],
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer for token lengths; default: characters.")] = None,
    samples: Annotated[int, typer.Option(help="Sample records to print.")] = 3,
    config: Annotated[Path | None, typer.Option(help="A run config whose data.columns and data.tags name the "
                                                     "file's fields.")] = None,
) -> None:
    """Counts, the format found, length statistics and sample records of a data file."""
    from dsft.config import load_config as load_run_config
    from dsft.data.columns import FieldMap
    from dsft.data.inspect import inspect_file

    fields = FieldMap.of(load_run_config(config).data) if config is not None else None
    inspect_file(str(file), tokenizer, samples, fields=fields)


@app.command()
def bench(
    suite: Annotated[str, typer.Option(help="tiny (CPU, seconds) or h100 (the four published setups, on a GPU).")] = "tiny",
    setup: Annotated[list[str] | None, typer.Option(help="Only this setup, by name or letter a-d (repeatable).")] = None,
    output: Annotated[Path | None, typer.Option(help="JSON report; default benchmarks/results/bench_SUITE.json.")] = None,
    longest: Annotated[bool, typer.Option(help="Also search the longest single sequence each recipe trains (GPU).")] = False,
    profile: Annotated[bool, typer.Option(help="Also profile each recipe's measured steps in a second run: where "
                                               "the time goes (matmul, attention, loss, ...) and what limits it.")] = False,
    row_tokens: Annotated[int | None, typer.Option(help="Tokens per packed row of B1 and dsft (default: the "
                                                        "setup's longest sample); B0 accumulates to match.")] = None,
) -> None:
    """Time B0 (transformers + PEFT), B1 (TRL) and dsft on the same data; refuse any speed whose loss is off."""
    from dsft.bench.run import run_bench

    run_bench(suite, output, setup, longest, profile=profile, row_tokens=row_tokens)


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="Run config YAML.")],
    gpus: Annotated[int, typer.Option(help="GPUs the run would use (all nodes together).")] = 1,
    gpu_memory: Annotated[float, typer.Option("--gpu-memory", help="Memory of one GPU in GiB.")] = 80.0,
    json_: Annotated[bool, typer.Option("--json", help="Print the plan as JSON instead of a table.")] = False,
    set_: SetOption = None,
) -> None:
    """Estimate per-GPU memory under each train.distributed engine and recommend the smallest that fits."""
    from dsft.config import load_config
    from dsft.train.plan import plan_run, print_plan

    print_plan(plan_run(load_config(config, set_ or []), gpus, gpu_memory), json_)


@config_app.command("show")
def config_show(
    config: Annotated[Path, typer.Argument(help="Run config YAML.")],
    set_: SetOption = [],
) -> None:
    """Print the resolved config with every default filled in."""
    from dsft.config import dump_config, load_config

    typer.echo(dump_config(load_config(config, set_)), nl=False)


@config_app.command("validate")
def config_validate(configs: Annotated[list[Path], typer.Argument(help="Run config YAML files.")]) -> None:
    """Check configs; prints each problem and exits 2 if any config is invalid."""
    from dsft.config import validate_files

    if not validate_files(configs):
        raise typer.Exit(2)


Store = Annotated[str | None, typer.Option(help="Registry store URI; default $MLFLOW_REGISTRY_URI, "
                                                "$MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db.")]


@app.command()
def gate(
    candidate: Annotated[str, typer.Argument(help="Run or model directory, or registry:NAME@candidate.")],
    against: Annotated[str | None, typer.Option(help="Baseline: run or model directory, or registry:NAME@production (default gate.against).")] = None,
    data: Annotated[Path | None, typer.Option(help="Test data with reference answers (default gate.data).")] = None,
    metrics: Annotated[str | None, typer.Option(help="Comma-separated metrics that must hold, e.g. exact_match,rougeL (default gate.metrics).")] = None,
    max_drop: Annotated[str | None, typer.Option(help="Largest relative drop allowed, e.g. 5% (default gate.max_drop_percent).")] = None,
    require_significance: Annotated[bool | None, typer.Option("--require-significance/--no-require-significance", help="Fail only on drops outside the bootstrap noise.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory; default CANDIDATE/gate/BASELINE.")] = None,
    store: Store = None,
    set_: SetOption = None,
) -> None:
    """Pass a candidate only if no metric drops more than the bound against a baseline (exit 0 pass, 1 fail, 2 error)."""
    from dsft.lifecycle.gate import parse_percent, run_gate

    overrides = {"against": against, "data": str(data) if data else None, "require_significance": require_significance,
                 "metrics": metrics.split(",") if metrics else None,
                 "max_drop_percent": parse_percent(max_drop, "--max-drop") if max_drop else None}
    raise typer.Exit(run_gate(candidate, overrides, set_ or [], str(out) if out else None, store))


@registry_app.command("register")
def registry_register(
    run: Annotated[Path, typer.Argument(help="A finished run directory.")],
    name: Annotated[str, typer.Option(help="Registered model name (created when new).")],
    store: Store = None,
) -> None:
    """Record a run as the next version of a model: data fingerprints, hyper-parameters, eval results."""
    from dsft.lifecycle.registry_views import register_run

    register_run(run, name, store)


@registry_app.command("list")
def registry_list(
    name: Annotated[str | None, typer.Argument(help="A model: list its versions; none: list the models.")] = None,
    store: Store = None,
) -> None:
    """List registered models, or the versions of one."""
    from dsft.lifecycle.registry_views import list_registry

    list_registry(name, store)


@registry_app.command("show")
def registry_show(
    ref: Annotated[str, typer.Argument(help="NAME (newest version), NAME@VERSION or NAME@ALIAS.")],
    store: Store = None,
    json_: Annotated[bool, typer.Option("--json", help="Print everything recorded as JSON.")] = False,
) -> None:
    """What a version records: data, hyper-parameters, evals, gate, deployments, retirement."""
    from dsft.lifecycle.registry_views import show_version

    show_version(ref, store, json_)


@registry_app.command("promote")
def registry_promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version number.")],
    alias: Annotated[str, typer.Option(help="production or candidate.")],
    force: Annotated[bool, typer.Option(help="Promote a retired version anyway.")] = False,
    store: Store = None,
) -> None:
    """Point an alias (production, candidate) at a version."""
    from dsft.lifecycle.registry_views import promote_version

    promote_version(name, version, alias, force, store)


@registry_app.command("retire")
def registry_retire(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version number.")],
    reason: Annotated[str, typer.Option(help="Why; kept with the version.")],
    store: Store = None,
) -> None:
    """Retire a version: its reason is kept, its aliases are removed."""
    from dsft.lifecycle.registry_views import retire_version

    retire_version(name, version, reason, store)


@registry_app.command("history")
def registry_history(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    store: Store = None,
) -> None:
    """Every event of a model's versions in time order."""
    from dsft.lifecycle.registry_views import print_history

    print_history(name, store)


def main() -> None:
    """Console entry point: user mistakes print as one clear message, never a traceback."""
    import os

    from dsft.errors import DsftError

    # Nothing about a run leaves the machine unless asked: the hub client (used by TRL) reports usage otherwise.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    from dsft.train.distributed import report_failure, world_size

    try:
        app()
    except DsftError as exc:
        if world_size() > 1:
            report_failure(str(exc))  # a worker of dsft train --nproc: the launcher names this rank
            sys.exit(exc.exit_code)
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if world_size() > 1:
            report_failure(f"{type(exc).__name__}: {exc}")
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
