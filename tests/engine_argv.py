"""Check the engine command lines of a ray-launch plan with the engines' own parsers.

Usage: engine_argv.py PLAN.json...   (one process for all: the parsers import once; run with .venv-vllm's python; PYTHONPATH must include
.cache/sglang-parser/site for SGLang plans). Exit 0 when every `engine` command parses and
passes vLLM's own validation; otherwise print the offending command and exit 1.
"""
import argparse, contextlib, io, json, sys

def check(path):
    plan = json.load(open(path))
    # a plan of several models has one engine and model per entry
    models = {m["model"] for m in plan.get("models", [])} or {plan["model"]}
    checked, engines = 0, set()
    for rank in plan["ranks"]:
        for cmd in rank["commands"]:
            if cmd["name"] != "engine":
                continue
            argv = cmd["argv"]
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    sglang = argv[1:3] == ["-m", "sglang.launch_server"]
                    engines.add("sglang" if sglang else "vllm")
                    if not sglang:
                        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
                        from vllm.utils.argparse_utils import FlexibleArgumentParser
                        assert argv[1] == "serve", argv
                        parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
                        # `vllm serve MODEL`: the model is the positional model_tag
                        args = parser.parse_args(argv[2:])
                        validate_parsed_serve_args(args)
                        assert args.model_tag in models, args.model_tag
                    else:
                        from sglang.srt.server_args import ServerArgs
                        assert argv[1:3] == ["-m", "sglang.launch_server"], argv
                        parser = argparse.ArgumentParser(prog="sglang.launch_server")
                        ServerArgs.add_cli_args(parser)
                        args = parser.parse_args(argv[3:])
                        assert args.model_path in models, args.model_path
            except (SystemExit, Exception) as e:
                print(f"{path}: rank {rank['node_rank']} ({rank['node']}): {' '.join(argv)}\n  rejected: {e!r} {err.getvalue().strip()}")
                sys.exit(1)
            checked += 1
    print(f"{path}: {checked} engine command(s) accepted by the {' and '.join(sorted(engines))} parser")
    if not checked:
        sys.exit(1)


for path in sys.argv[1:]:
    check(path)
