"""Single entry point: ``python -m cryotorch.train +job=NAME key=value ...``.

Composes the Hydra config, builds the launcher (Lightning Fabric), logger and job, and runs
the job. Works under ``torchrun`` (one process per device) and with Hydra multirun (``-m``).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning_fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from cryotorch.errors import InputError
from cryotorch.jobs.context import RunContext
from cryotorch.ops.symmetry import symmetry_order
from cryotorch.runtime import memory_budget_bytes, start_thread_pool, use_deterministic_kernels

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
log = logging.getLogger("cryotorch")


def build_fabric(compute: DictConfig) -> Fabric:
    """Fabric from the ``compute`` group; under torchrun the process layout comes from its env."""
    devices: int | str = compute.devices
    num_nodes = compute.num_nodes
    strategy = compute.strategy
    if "LOCAL_WORLD_SIZE" in os.environ:
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
        num_nodes = int(os.environ["WORLD_SIZE"]) // devices
        strategy = "ddp" if strategy == "auto" else strategy
    accelerator = str(compute.accelerator)
    if accelerator not in ("auto", "cpu", "cuda"):
        raise InputError(f"compute.accelerator={accelerator} is not one of auto, cpu, cuda")
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise InputError(
                f"compute.accelerator=cuda, but PyTorch {torch.__version__} ({build}) sees no CUDA device: run with compute.accelerator=cpu "
                "(or auto), or on a machine whose GPU nvidia-smi lists, where scripts/install.sh installs a CUDA build"
            )
        visible = torch.cuda.device_count()
        if isinstance(devices, int) and devices > visible:
            setting = "torchrun --nproc_per_node" if "LOCAL_WORLD_SIZE" in os.environ else "compute.devices"
            raise InputError(f"{setting}={devices} asks for more GPUs than the {visible} visible on this node: give at most {visible} (one process per GPU)")
    if accelerator == "cpu" and compute.process_group_backend is None:
        backend = "gloo"
    else:
        backend = compute.process_group_backend
    if strategy == "ddp" and backend is not None:
        from lightning_fabric.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend=backend)
    return Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)


def run(cfg: DictConfig) -> None:
    """Build the run context from ``cfg`` and run ``cfg.job``."""
    if "job" not in cfg:
        raise InputError("no job selected: add +job=NAME (simulate, reconstruct, class3d, select) to the command line")
    try:
        symmetry_order(str(cfg.model.symmetry))
    except ValueError as error:
        raise InputError(f"model.symmetry: {error}") from None
    fabric = build_fabric(cfg.compute)
    fabric.launch()  # under torchrun this may set the number of threads
    start_thread_pool(int(cfg.compute.num_threads) if cfg.compute.num_threads else None)
    use_deterministic_kernels(fabric.device)
    try:
        budget = memory_budget_bytes(fabric.device, cfg.compute.memory_budget_gb)
    except ValueError as error:
        raise InputError(str(error)) from None
    leaves = cfg.compute.sum_tree_leaves
    if not (isinstance(leaves, int) and leaves >= 1 and leaves & (leaves - 1) == 0):
        raise InputError(f"compute.sum_tree_leaves={leaves} must be a power of two (1, 2, 4, 8, ...): the most processes that give a run's bits")
    fabric.seed_everything(cfg.seed, verbose=False)
    # every process must use rank 0's folder (timestamped folder names can differ by a second)
    output_dir = Path(fabric.broadcast(HydraConfig.get().runtime.output_dir, src=0))
    writer = None
    if fabric.global_rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
        writer = instantiate(cfg.logger, root_dir=str(output_dir)).experiment
    context = RunContext(
        fabric=fabric,
        output_dir=output_dir,
        writer=writer,
        seed=int(cfg.seed),
        memory_budget_bytes=budget,
        sum_tree_leaves=int(leaves),
        particles=Path(cfg.data.particles) if cfg.data.particles else None,
        project_dir=Path(cfg.data.project_dir) if cfg.data.project_dir else None,
        preload=bool(cfg.data.preload),
        padding_factor=float(cfg.model.padding_factor),
        symmetry=str(cfg.model.symmetry),
        sampling=OmegaConf.to_container(cfg.sampling, resolve=True),
    )
    # import the job's module first so that a broken import shows its own error, not Hydra's
    importlib.import_module(str(cfg.job._target_).rsplit(".", 1)[0])
    job = instantiate(cfg.job, _convert_="all")
    log.info("running job %s in %s", cfg.job.name, output_dir)
    job.run(context)
    if writer is not None:
        writer.close()
    fabric.barrier()


def input_error(error: BaseException) -> InputError | None:
    """The bad-input error behind ``error`` (Hydra wraps errors raised while building the
    job), or None where bad input did not cause it."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, InputError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; bad input ends the run with its message instead of a traceback."""
    try:
        run(cfg)
    except Exception as error:
        cause = input_error(error)
        if cause is None:
            raise
        log.error("%s", cause)
        sys.exit(2)


if __name__ == "__main__":
    main()
