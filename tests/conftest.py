import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("MRCNN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real COCO 2017 subsets beside the repository (../shared/data); skips where absent."""
    if not (SHARED_DATA / "coco_tiny16").is_dir():
        pytest.skip(f"real COCO data not found at {SHARED_DATA} (set MRCNN_SHARED_DATA)")
    return SHARED_DATA
