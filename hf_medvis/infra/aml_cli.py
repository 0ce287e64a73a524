"""``hf-medvis aml-job``: write an Azure ML CLI v2 command job for a recipe (submit with ``az ml job create -f FILE``)."""

from __future__ import annotations

import argparse

from .aml import DATA_MODES, RECIPES, AmlJobSpec, write_job


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "aml-job",
        help="write an Azure ML job YAML that runs a recipe on N nodes x G GPUs",
        description="Writes an Azure ML CLI v2 command job: PyTorch distribution (one process per node, accelerate "
        "starts one per GPU), the data as an input, outputs, NCCL settings, MLflow reporting, and beside it the "
        "environment's build context (an ACPT image that `hf-medvis env --image` passes, plus this package's "
        "dependencies). Submit with `az ml job create -f job.yml`. Nothing is contacted and no credentials are read.",
    )
    parser.add_argument("--recipe", required=True, choices=RECIPES)
    parser.add_argument("--config", required=True, help="the recipe's YAML config (uploaded with the job)")
    parser.add_argument("--compute", required=True, help="compute cluster name")
    parser.add_argument("--instance-type", required=True, help="VM SKU, e.g. Standard_ND96isr_H100_v5")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument(
        "--data",
        required=True,
        help="training data: azureml://datastores/NAME/paths/PATH, abfss://, wasbs://, https:// or a registered "
        "data asset azureml:NAME:VERSION (also NAME@VERSION, NAME@latest)",
    )
    parser.add_argument("--data-mode", default="ro_mount", choices=DATA_MODES)
    parser.add_argument(
        "--environment",
        default=None,
        help="an ACPT environment to build on (default: the newest one `hf-medvis env --image` passes; "
        "NAME:VERSION pins a build), or a registered environment azureml:NAME:VERSION used as it is",
    )
    parser.add_argument(
        "--output-path",
        default=None,
        help="datastore folder for the outputs (azureml://datastores/NAME/paths/PATH), so that a new job can "
        "resume another's checkpoints (default: the job's own folder, kept when Azure ML restarts a preempted job)",
    )
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON, e.g. ds_configs/zero2.json")
    parser.add_argument("--shm-size", default="64g", help="/dev/shm for DataLoader workers (default 64g)")
    parser.add_argument("--timeout-hours", type=float, default=None)
    parser.add_argument("--job-tier", default=None, help="queue tier, e.g. Spot (preemptible; the recipe resumes)")
    parser.add_argument("--code", default=".", help="repository root uploaded as the job's code (default .)")
    parser.add_argument("--out", default="job.yml")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more recipe flags, e.g. -- --bf16 true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    extra = [a for a in args.extra if a != "--"] if args.extra else []
    spec = AmlJobSpec(
        recipe=args.recipe,
        config=args.config,
        compute=args.compute,
        instance_type=args.instance_type,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        data=args.data,
        environment=args.environment,
        deepspeed=args.deepspeed,
        data_mode=args.data_mode,
        output_path=args.output_path,
        shm_size=args.shm_size,
        timeout_hours=args.timeout_hours,
        job_tier=args.job_tier,
        extra_args=extra,
    )
    out, context = write_job(spec, args.out, code_root=args.code)
    if context is not None:
        print(f"wrote {out} and its environment's build context {context}/ (Dockerfile, install.sh, requirements.txt)")
    else:
        print(f"wrote {out} (environment {args.environment}, used as it is)")
    print(f"submit with: az ml job create -f {out}")
    return 0
