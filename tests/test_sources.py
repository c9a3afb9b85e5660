"""Checkpoint sources (local, s3 via a real moto server, hf offline) and the LlamaGen catalogue."""

import pytest
from moto.server import ThreadedMotoServer

from ddcore.settings import Settings
from ddcore.sources import (
    KNOWN_CHECKPOINTS,
    CheckpointInfo,
    SourceError,
    find_checkpoint,
    get_checkpoint,
    parse_hf_source,
    register_checkpoint,
    resolve_source,
)
from ddcore.teachers.llamagen.catalogue import (
    PUBLISHED_TEACHERS,
    llamagen_block_size_from_filename,
    llamagen_info_from_filename,
)


def test_local_paths(tmp_path):
    f = tmp_path / "c2i_B_256.pt"
    f.write_bytes(b"x")
    assert resolve_source(str(f)) == f
    assert resolve_source(f"file://{f}") == f
    with pytest.raises(SourceError, match="not found"):
        resolve_source(str(tmp_path / "nope.pt"))
    with pytest.raises(SourceError, match="unsupported checkpoint source"):
        resolve_source("gs://bucket/x.pt")


@pytest.fixture
def s3_server(monkeypatch):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield f"http://{host}:{port}"
    server.stop()


def test_s3_download_to_cache(tmp_path, s3_server):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="teachers")
    payload = bytes(range(256)) * 1000
    client.put_object(Bucket="teachers", Key="llamagen/c2i_B_256.pt", Body=payload)
    settings = Settings(s3_endpoint_url=s3_server, cache_dir=tmp_path / "cache")

    path = resolve_source("s3://teachers/llamagen/c2i_B_256.pt", settings=settings)
    assert path == tmp_path / "cache" / "s3" / "teachers" / "llamagen" / "c2i_B_256.pt"
    assert path.read_bytes() == payload
    assert [p.name for p in path.parent.iterdir()] == ["c2i_B_256.pt"]  # no temp files left

    # a cached copy of the right size is reused; a stale one is replaced
    mtime = path.stat().st_mtime_ns
    assert (
        resolve_source("s3://teachers/llamagen/c2i_B_256.pt", settings=settings).stat().st_mtime_ns == mtime
    )
    path.write_bytes(b"partial")
    assert resolve_source("s3://teachers/llamagen/c2i_B_256.pt", settings=settings).read_bytes() == payload

    with pytest.raises(SourceError, match="no such object"):
        resolve_source("s3://teachers/llamagen/missing.pt", settings=settings)
    with pytest.raises(SourceError, match="expected s3://bucket/key"):
        resolve_source("s3://teachers", settings=settings)


def test_hf_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE") as err:
        resolve_source("hf://FoundationVision/LlamaGen/c2i_B_256.pt", settings=Settings(cache_dir=tmp_path))
    assert "local path or an s3:// copy" in str(err.value)


def test_parse_hf_source():
    assert parse_hf_source("hf://FoundationVision/LlamaGen/c2i_B_256.pt") == (
        "FoundationVision/LlamaGen",
        "c2i_B_256.pt",
        None,
    )
    assert parse_hf_source("hf://org/repo@v1/sub/dir/f.pt") == ("org/repo", "sub/dir/f.pt", "v1")
    with pytest.raises(SourceError):
        parse_hf_source("hf://only/repo")


def test_registry_covers_the_llamagen_teachers():
    assert PUBLISHED_TEACHERS and all(n in KNOWN_CHECKPOINTS for n in PUBLISHED_TEACHERS)
    b = get_checkpoint("llamagen-b")
    assert (b.filename, b.config, b.image_size, b.block_size) == ("c2i_B_256.pt", "GPT-B", 256, 256)
    assert b.source == "hf://FoundationVision/LlamaGen/c2i_B_256.pt"
    assert b.layout == "model" and b.tokenizer == "vq-ds16-c2i"
    assert b.sampling == {"cfg_scale": 2.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    xl = get_checkpoint("llamagen-xl-384")
    assert (xl.filename, xl.config, xl.image_size, xl.block_size) == ("c2i_XL_384.pt", "GPT-XL", 384, 576)
    assert xl.sampling["cfg_scale"] == 1.75
    assert get_checkpoint("llamagen-3b-384").config == "GPT-3B"
    assert get_checkpoint("llamagen-xxl-384").layout == "raw"
    assert get_checkpoint("llamagen-3b-384").layout == "raw"
    assert get_checkpoint("vq-ds16-c2i").filename == "vq_ds16_c2i.pt"
    assert get_checkpoint("vq-ds8-c2i").config == "VQ-8"
    # VAR entries appear once ddcore.teachers.var.catalogue is imported; they never shadow a LlamaGen name
    assert all(KNOWN_CHECKPOINTS[n].family == "var" for n in KNOWN_CHECKPOINTS if n.startswith("var"))
    with pytest.raises(KeyError, match="unknown checkpoint"):
        get_checkpoint("llamagen-q")


def test_block_size_comes_from_the_file_name():
    # RoPE is not in the state dict: a wrong block_size would load silently, so it is derived here
    assert llamagen_block_size_from_filename("c2i_L_256.pt") == 256
    assert llamagen_block_size_from_filename("/ckpts/c2i_L_384.pt") == 576
    assert llamagen_info_from_filename("s3://b/x/c2i_L_384.pt").name == "llamagen-l-384"
    assert find_checkpoint("/some/dir/c2i_B_384.pt").block_size == 576
    assert find_checkpoint("llamagen-l").block_size == 256
    with pytest.raises(ValueError, match="image size"):
        llamagen_block_size_from_filename("c2i_B.pt")
    with pytest.raises(ValueError, match="not a LlamaGen c2i"):
        llamagen_info_from_filename("model.pt")


def test_register_checkpoint():
    info = CheckpointInfo(name="test-var-x", family="var", kind="var", source="hf://org/repo/x.pth")
    try:
        register_checkpoint(info)
        assert find_checkpoint("x.pth") is info
        register_checkpoint(info)  # identical re-registration is a no-op
        with pytest.raises(ValueError, match="already registered"):
            register_checkpoint(CheckpointInfo(name="test-var-x", family="var", kind="var", source="/y.pth"))
    finally:
        KNOWN_CHECKPOINTS.pop("test-var-x", None)
