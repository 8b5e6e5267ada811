import os

# Before torch loads OpenMP: spinning threads wait for a core that another process holds, which made
# elementwise ops 50-100x slower on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite runs on 2 CPU cores; oversubscribing threads makes it slower, not faster.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_pipeline():
    """A randomly initialised tiny LatentDiffPipeline (16 px images), shared read-only by tests."""
    from latentdiff import pipeline_from_preset

    pipe = pipeline_from_preset("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline saved as a pipeline folder (16 px images, 8x8 latents)."""
    path = tmp_path_factory.mktemp("tiny") / "pipeline"
    tiny_pipeline.save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and spinning OpenMP threads slow a shared machine down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
