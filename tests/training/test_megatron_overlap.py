"""megatron's overlapped data-parallel communication (gradient reduce-scatter during the backward pass, parameter
all-gather during the next forward pass) and gradient reduction in the parameter dtype, switched on from the
`parallel` section: the same steps and checkpointed weights as without overlap, at dp=2 on gloo."""

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from helpers.megatron_case import case_file, load_case, local_weights, new_engine, step  # noqa: E402
from helpers.megatron_cpu import save_result, spawn  # noqa: E402

OVERLAP = (
    "parallel.overlap_grad_reduce=true",
    "parallel.overlap_param_gather=true",
    "parallel.grad_reduce_in_fp32=false",
)


def _worker(rank, out_dir, case_path):
    case = load_case(case_path)
    out = {}
    for name, overrides in (("plain", ()), ("overlap", OVERLAP)):
        from megatron.core import parallel_state

        engine = new_engine(case, overrides=overrides)  # world 2: tp=1 x dp=2
        ddp = engine.ddp[0].ddp_config
        assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather) == ((name == "overlap"),) * 2
        assert ddp.grad_reduce_in_fp32 == (name == "plain")
        losses, norms = [], []
        for seed in (1, 2, 3):
            torch.manual_seed(seed)
            stats = step(engine, case["batch"])
            losses.append(stats.loss)
            norms.append(stats.result.grad_norm)
        engine._sync_params()  # what a checkpoint or a sample grid does before reading the weights
        out[name] = {"losses": losses, "norms": norms, "weights": local_weights(engine)}
        parallel_state.destroy_model_parallel()
    save_result(out_dir, rank, out)


@pytest.mark.slow
def test_overlapped_communication_gives_the_same_steps(tmp_path):
    case_file(tmp_path / "case.pt")
    for r in spawn(_worker, 2, 0, 0, tmp_path, tmp_path / "case.pt"):
        plain, overlap = r["plain"], r["overlap"]
        torch.testing.assert_close(overlap["losses"], plain["losses"], rtol=1e-6, atol=0)
        torch.testing.assert_close(overlap["norms"], plain["norms"], rtol=1e-6, atol=0)
        for k, v in plain["weights"].items():
            torch.testing.assert_close(overlap["weights"][k], v, rtol=1e-6, atol=1e-7, msg=k)
