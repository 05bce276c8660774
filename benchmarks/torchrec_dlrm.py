"""TorchRec peer benchmark: DLRM training throughput on CPU.

This script is the *reference* side of jaxrec's throughput comparison. It
trains TorchRec's own ``torchrec.models.dlrm.DLRM`` wrapped in
``DistributedModelParallel`` (single-process gloo group, world size 1, CPU:
the standard TorchRec CPU path) and reports samples/s. It never imports
jaxrec, and jaxrec never depends on TorchRec: TorchRec lives in its own venv.

Venv setup (outside the repo, with the system python3 3.11; torch 2.13.0 is
the CPU wheel on local disk, so pip must not pull a CUDA torch)::

    python3 -m venv /work/torchrec-venv
    /work/torchrec-venv/bin/pip install torch==2.13.0
    /work/torchrec-venv/bin/pip install fbgemm-gpu-cpu==1.8.0
    /work/torchrec-venv/bin/pip install --no-deps torchrec==1.9.2
    /work/torchrec-venv/bin/pip install tensordict torchmetrics==1.0.3 tqdm pyre-extensions
    /work/torchrec-venv/bin/python -c "import torchrec"

(pip then warns "torchrec 1.9.2 requires fbgemm-gpu, which is not
installed": harmless, fbgemm-gpu-cpu provides the same ``fbgemm_gpu`` module.)

Run (defaults = the acceptance config)::

    /work/torchrec-venv/bin/python benchmarks/torchrec_dlrm.py --optimizer=sgd
    /work/torchrec-venv/bin/python benchmarks/torchrec_dlrm.py --optimizer=adagrad

Model: DLRM over an EmbeddingBagCollection of ``num_tables`` tables
(``rows_per_table`` x ``embedding_dim``, one feature per table, one ID per
example, sum pooling), bottom MLP ``--bottom_mlp``, dot interaction, top MLP
``--top_mlp``, BCEWithLogits loss.

Optimizers:
  * embeddings: fused into the backward with
    ``torchrec.optim.apply_optimizer_in_backward``; the sharded EBC then runs
    FBGEMM's CPU table-batched-embedding (TBE) kernel with the update applied
    inside its backward (no dense embedding gradient is ever materialised).
      - ``sgd``     -> ``torch.optim.SGD``   -> FBGEMM EXACT_SGD
      - ``adagrad`` -> ``--emb_adagrad=rowwise`` (default):
                       ``torchrec.optim.RowWiseAdagrad`` -> FBGEMM
                       EXACT_ROWWISE_ADAGRAD (one accumulator per row, the
                       usual DLRM recipe);
                       ``--emb_adagrad=exact``: ``torch.optim.Adagrad`` ->
                       FBGEMM EXACT_ADAGRAD (one accumulator per element,
                       same maths as torch.optim.Adagrad).
    ("exact" in FBGEMM's names means duplicate IDs in a batch are coalesced
    before the update, as a dense optimizer would do.)
  * dense part (bottom/top MLPs, DDP-wrapped by DMP): plain ``torch.optim.SGD``
    or ``torch.optim.Adagrad`` over the non-fused parameters via
    ``KeyedOptimizerWrapper``, combined with ``model.fused_optimizer`` in a
    ``CombinedOptimizer`` (the TorchRec DLRM example's recipe).

Data: ``--num_batches`` batches of random IDs (uniform, or Zipf with
``--id_dist=zipf``), log-normal dense features and Bernoulli(0.5) labels are
generated before timing, as KeyedJaggedTensor, and cycled through.

Allocator: with stock glibc malloc, PyTorch's per-step activation buffers
(several MB each) are unmapped/trimmed and page-faulted back in on every step:
~6.9k minor faults (~27 MB) per step at the default config, which the JSON
reports as ``minor_faults_per_step``. ``--malloc_tuning`` calls glibc
``mallopt`` before torch starts (mmap threshold 32 MB, trim threshold 1 GB,
top pad 256 MB), which brings this to ~0 -- the in-process analogue of the
jemalloc/tcmalloc preload that PyTorch CPU tuning guides recommend. It is off
by default so the default numbers are stock TorchRec; the JSON records
``malloc_tuning``.

Timing: ``--warmup_steps`` untimed steps, then ``--windows`` windows of
``--steps_per_window`` full training steps (forward, backward incl. fused
embedding update, dense optimizer step); the reported throughput is the median
over windows. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
import warnings


def _parse_int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch_size", type=int, default=2048)
    p.add_argument("--embedding_dim", type=int, default=64)
    p.add_argument("--num_tables", type=int, default=26)
    p.add_argument("--rows_per_table", type=int, default=100_000)
    p.add_argument("--bottom_mlp", type=str, default="512,256,64")
    p.add_argument("--top_mlp", type=str, default="512,256,1")
    p.add_argument("--num_dense", type=int, default=13)
    p.add_argument("--optimizer", choices=["sgd", "adagrad"], default="sgd")
    p.add_argument(
        "--emb_adagrad",
        choices=["rowwise", "exact"],
        default="rowwise",
        help="embedding Adagrad flavour when --optimizer=adagrad: FBGEMM "
        "EXACT_ROWWISE_ADAGRAD (rowwise) or EXACT_ADAGRAD (exact, per element)",
    )
    p.add_argument("--lr", type=float, default=None,
                   help="default: 0.01 for sgd, 0.01 for adagrad")
    p.add_argument("--eps", type=float, default=1e-8, help="Adagrad epsilon")
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--steps_per_window", type=int, default=10)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default: os.cpu_count()")
    p.add_argument("--num_batches", type=int, default=4,
                   help="distinct pre-generated batches cycled through")
    p.add_argument("--id_dist", choices=["uniform", "zipf"], default="uniform")
    p.add_argument("--zipf_alpha", type=float, default=1.05)
    p.add_argument("--no_plan_print", action="store_true")
    p.add_argument(
        "--malloc_tuning",
        action="store_true",
        help="raise glibc's mmap/trim thresholds (mallopt) so per-step "
        "activation buffers are not returned to the OS and page-faulted back "
        "in every step; off by default (stock behaviour), see module docstring",
    )
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 0.01
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    args.bottom_mlp_sizes = _parse_int_list(args.bottom_mlp)
    args.top_mlp_sizes = _parse_int_list(args.top_mlp)
    if args.bottom_mlp_sizes[-1] != args.embedding_dim:
        p.error("last --bottom_mlp size must equal --embedding_dim")
    if args.top_mlp_sizes[-1] != 1:
        p.error("last --top_mlp size must be 1")
    return args


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _zipf_ids(torch, n: int, rows: int, alpha: float, gen) -> "torch.Tensor":
    # Inverse-CDF sampling of a truncated Zipf over [0, rows), then a fixed
    # random permutation so hot rows are spread over the table.
    ranks = torch.arange(1, rows + 1, dtype=torch.float64)
    probs = ranks.pow(-alpha)
    cdf = torch.cumsum(probs / probs.sum(), 0)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    idx = torch.searchsorted(cdf, u).clamp_(max=rows - 1)
    perm = torch.randperm(rows, generator=gen)
    return perm[idx]


def make_batches(torch, args, feature_names):
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(args.seed + 1)
    B, F = args.batch_size, args.num_tables
    batches = []
    for _ in range(args.num_batches):
        if args.id_dist == "uniform":
            ids = torch.randint(0, args.rows_per_table, (F * B,), generator=gen)
        else:
            ids = torch.cat([
                _zipf_ids(torch, B, args.rows_per_table, args.zipf_alpha, gen)
                for _ in range(F)
            ])
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=feature_names,
            values=ids.to(torch.int64),
            lengths=torch.ones(F * B, dtype=torch.int32),
        )
        dense = torch.empty(B, args.num_dense).log_normal_(0.0, 1.0, generator=gen)
        labels = torch.randint(0, 2, (B,), generator=gen)
        batches.append(Batch(dense_features=dense, sparse_features=kjt, labels=labels))
    return batches


def tune_glibc_malloc() -> bool:
    """Keep freed activation buffers in the heap instead of giving them back.

    With glibc defaults, PyTorch's per-step temporaries of several MB are
    served by mmap / returned by trimming and page-faulted in again on every
    step (~7k minor faults, ~27 MB, per step at the default config: roughly
    10% of step time). This is the same effect PyTorch's CPU tuning guides
    address with jemalloc/tcmalloc; here it is done in-process via mallopt.
    Returns False where glibc is not available.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's max
        ok &= libc.mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
        ok &= libc.mallopt(M_TOP_PAD, 256 * 1024 * 1024)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except ImportError:  # pragma: no cover
        return -1


def main(argv=None) -> int:
    args = parse_args(argv)
    malloc_tuned = tune_glibc_malloc() if args.malloc_tuning else False

    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import torchrec
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.model_parallel import (
        DistributedModelParallel,
        get_default_sharders,
    )
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.storage_reservations import (
        HeuristicalStorageReservation,
    )
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    # ---- single-process gloo group (world size 1) ----
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    dist.init_process_group(backend="gloo", rank=0, world_size=1)
    device = torch.device("cpu")

    # ---- model ----
    feature_names = [f"f{i}" for i in range(args.num_tables)]
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}",
            embedding_dim=args.embedding_dim,
            num_embeddings=args.rows_per_table,
            feature_names=[feature_names[i]],
            pooling=PoolingType.SUM,
        )
        for i in range(args.num_tables)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    train_model = DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=args.num_dense,
            dense_arch_layer_sizes=args.bottom_mlp_sizes,
            over_arch_layer_sizes=args.top_mlp_sizes,
            dense_device=device,
        )
    )

    # ---- embedding optimizer, fused into the backward ----
    if args.optimizer == "sgd":
        emb_opt_cls, emb_kwargs = torch.optim.SGD, {"lr": args.lr}
        emb_opt_desc = "torch.optim.SGD -> fused FBGEMM EXACT_SGD"
    elif args.emb_adagrad == "rowwise":
        emb_opt_cls, emb_kwargs = RowWiseAdagrad, {"lr": args.lr, "eps": args.eps}
        emb_opt_desc = "torchrec RowWiseAdagrad -> fused FBGEMM EXACT_ROWWISE_ADAGRAD"
    else:
        emb_opt_cls, emb_kwargs = torch.optim.Adagrad, {"lr": args.lr, "eps": args.eps}
        emb_opt_desc = "torch.optim.Adagrad -> fused FBGEMM EXACT_ADAGRAD"
    apply_optimizer_in_backward(
        emb_opt_cls, train_model.model.sparse_arch.parameters(), emb_kwargs
    )

    # ---- plan + DMP ----
    sharders = get_default_sharders()
    planner = EmbeddingShardingPlanner(
        topology=Topology(
            local_world_size=1, world_size=1, compute_device=device.type
        ),
        batch_size=args.batch_size,
        storage_reservation=HeuristicalStorageReservation(percentage=0.05),
    )
    plan = planner.collective_plan(train_model, sharders, dist.GroupMember.WORLD)
    model = DistributedModelParallel(
        module=train_model, device=device, plan=plan, sharders=sharders
    )
    plan_summary = sorted(
        {
            (ps.sharding_type, ps.compute_kernel)
            for mod_plan in plan.plan.values()
            for ps in mod_plan.values()
        }
    )

    # ---- dense optimizer ----
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters()))
    if args.optimizer == "sgd":
        dense_factory = lambda ps: torch.optim.SGD(ps, lr=args.lr)  # noqa: E731
        dense_opt_desc = "torch.optim.SGD"
    else:
        dense_factory = lambda ps: torch.optim.Adagrad(  # noqa: E731
            ps, lr=args.lr, eps=args.eps
        )
        dense_opt_desc = "torch.optim.Adagrad"
    dense_optimizer = KeyedOptimizerWrapper(dense_params, dense_factory)
    optimizer = CombinedOptimizer([model.fused_optimizer, dense_optimizer])

    n_dense_params = sum(p.numel() for p in dense_params.values())
    # What FBGEMM actually runs for the embeddings: the optimizer of each
    # table-batched-embedding module behind the sharded EBC's lookups (these
    # live in a plain list, not as registered submodules).
    tbe_optims = set()
    for m in model.modules():
        for lookup in getattr(m, "_lookups", None) or []:
            for em in getattr(lookup, "_emb_modules", None) or []:
                tbe = getattr(em, "_emb_module", None)
                tbe_optims.add(
                    f"{type(tbe).__name__}(optimizer={getattr(tbe, 'optimizer', '?')}, "
                    f"use_cpu={getattr(tbe, 'use_cpu', '?')})"
                )
    tbe_optims = sorted(tbe_optims)

    # ---- data (outside the timed region) ----
    batches = make_batches(torch, args, feature_names)

    model.train()

    def step(batch):
        optimizer.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        return loss

    nb = len(batches)
    it = 0
    t0 = time.perf_counter()
    for _ in range(args.warmup_steps):
        loss = step(batches[it % nb])
        it += 1
    warmup_s = time.perf_counter() - t0
    first_loss = float(loss) if args.warmup_steps else float("nan")

    window_sps = []
    window_s = []
    faults0 = _minor_faults()
    for _ in range(args.windows):
        t0 = time.perf_counter()
        for _ in range(args.steps_per_window):
            loss = step(batches[it % nb])
            it += 1
        dt = time.perf_counter() - t0
        window_s.append(dt)
        window_sps.append(args.steps_per_window * args.batch_size / dt)
    timed_steps = args.windows * args.steps_per_window
    faults_per_step = (_minor_faults() - faults0) / max(1, timed_steps)
    final_loss = float(loss)
    med = statistics.median(window_sps)

    # ---- report ----
    print(f"torch {torch.__version__}, torchrec {getattr(torchrec, '__version__', '?')}, "
          f"python {platform.python_version()}, threads {torch.get_num_threads()}")
    if not args.no_plan_print:
        print(f"sharding plan (type, kernel): {plan_summary}")
    print(f"embedding optimizer: {emb_opt_desc}")
    print(f"  FBGEMM TBE modules: {tbe_optims}")
    print(f"dense optimizer:     {dense_opt_desc} over {len(dense_params)} tensors, "
          f"{n_dense_params} params (DDP-wrapped by DMP)")
    print(f"glibc malloc tuning: {'on' if malloc_tuned else 'off'}; "
          f"minor page faults per timed step: {faults_per_step:.0f}")
    print(f"warmup: {args.warmup_steps} steps in {warmup_s:.2f}s; "
          f"loss first/last {first_loss:.4f}/{final_loss:.4f}")
    print(f"{'window':>6} {'seconds':>9} {'samples/s':>12}")
    for i, (s, v) in enumerate(zip(window_s, window_sps)):
        print(f"{i:>6} {s:>9.3f} {v:>12.0f}")
    print(f"{'median':>6} {'':>9} {med:>12.0f}")

    result = {
        "framework": "torchrec",
        "samples_per_s": med,
        "window_samples_per_s": window_sps,
        "batch_size": args.batch_size,
        "embedding_dim": args.embedding_dim,
        "optimizer": args.optimizer,
        "embedding_optimizer": (
            "exact_sgd" if args.optimizer == "sgd"
            else ("exact_rowwise_adagrad" if args.emb_adagrad == "rowwise"
                  else "exact_adagrad")
        ),
        "dense_optimizer": dense_opt_desc,
        "torch_threads": torch.get_num_threads(),
        "num_tables": args.num_tables,
        "rows_per_table": args.rows_per_table,
        "bottom_mlp": args.bottom_mlp_sizes,
        "top_mlp": args.top_mlp_sizes,
        "num_dense": args.num_dense,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "steps_per_window": args.steps_per_window,
        "windows": args.windows,
        "seed": args.seed,
        "id_dist": args.id_dist,
        "num_batches": args.num_batches,
        "sharding": [list(x) for x in plan_summary],
        "tbe_modules": tbe_optims,
        "malloc_tuning": malloc_tuned,
        "minor_faults_per_step": faults_per_step,
        "final_loss": final_loss,
        "torch_version": torch.__version__,
        "torchrec_version": getattr(torchrec, "__version__", None),
    }
    sys.stdout.flush()
    dist.destroy_process_group()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
