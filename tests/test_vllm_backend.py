"""Generation by vLLM: ``mmed-rag generate --backend openai`` against a real vLLM server on 127.0.0.1 (CPU).

The served model is a ``convert-llava-med`` output (of a tiny LLaVA-Med written in the original layout), so these
tests also show that the conversion writes weights vLLM loads. One server starts per module (about a minute on
2 cores); the answers are compared with ``--backend hf`` on the same directory, prompts and images.

vLLM lives in ``.venv-vllm`` (``make vllm-env``; ``make test`` builds it first). Without it these tests fail with
that command, unless ``MMED_RAG_SKIP_VLLM=1`` is set or ``make test`` found too little disk to build it and left
``.venv-vllm.skipped`` saying so.
"""

import importlib.util
import json
import os
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPVisionConfig

from mmed_rag.cli import main
from mmed_rag.config import ConfigError
from mmed_rag.data.phantoms import PhantomConfig, make_phantoms
from mmed_rag.generation.configs import ConvertConfig, GeneratorConfig, PipelineConfig
from mmed_rag.generation.convert import convert_llava_med
from mmed_rag.generation.generator import GeneratorError, load_generator
from mmed_rag.generation.openai_backend import ServerError
from mmed_rag.generation.served_layout import served_layout_problem
from mmed_rag.generation.vllm_server import LocalVLLMServer
from mmed_rag.jsonl import read_jsonl
from mmed_rag.pipeline import generate
from mmed_rag.resumable import partial_path
from mmed_rag.testing import SERVABLE_TEXT, free_port, save_tiny_llava

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
# Left by `make test` when the disk had no room to build .venv-vllm (the Makefile's vllm-env-if-room).
VLLM_SKIPPED = ROOT / ".venv-vllm.skipped"
RECORDS = 12
MAX_NEW_TOKENS = 8


def original_llava_med(tiny: Path, out: Path) -> tuple[Path, Path]:
    """The tiny LLaVA of ``tiny`` as LLaVA-Med saves a checkpoint (llava_mistral config, LLaVA's weight names, the
    tower inside), and a config-only CLIP directory for ``--vision-tower``: what convert-llava-med reads."""
    config = json.loads((tiny / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    renames = (
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
    )
    weights = {}
    for name, tensor in load_file(tiny / "model.safetensors").items():
        old, new = next(rule for rule in renames if name.startswith(rule[0]))
        weights[new + name.removeprefix(old)] = tensor
    src = out / "llava-med"
    src.mkdir()
    save_file(weights, src / "model.safetensors")
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    keys += ("max_position_embeddings", "vocab_size", "rms_norm_eps", "bos_token_id", "eos_token_id")
    (src / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlavaMistralForCausalLM"],
                "model_type": "llava_mistral",
                **{key: text[key] for key in keys},
                "hidden_act": "silu",
                "tie_word_embeddings": False,
                "torch_dtype": "float32",
                "image_aspect_ratio": "pad",
                "mm_hidden_size": vision["hidden_size"],
                "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_feature": "patch",
                "mm_vision_select_layer": -2,
                "mm_vision_tower": "tiny-clip-tower",
            }
        )
    )
    AutoTokenizer.from_pretrained(tiny).save_pretrained(src)
    tower = out / "clip"
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
    CLIPVisionConfig(**{key: vision[key] for key in shape}).save_pretrained(tower)
    return src, tower


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of the server: it forwards ``passes`` chat requests, then drops every
    later one (the connection closes without an answer, as when a server dies), or delays each by ``delay`` s."""

    def __init__(self, upstream: str):
        self.upstream, self.passes, self.delay, self.forwarded = upstream, None, 0.0, 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.forward(None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    dropped = proxy.passes is not None and proxy.forwarded >= proxy.passes
                    proxy.forwarded += not dropped
                if dropped:
                    self.close_connection = True
                    return
                threading.Event().wait(proxy.delay)
                self.forward(body)

            def forward(self, body):
                answer = httpx.request(
                    self.command, proxy.upstream + self.path, content=body, headers={"Content-Type": "application/json"}
                )
                self.send_response(answer.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def vllm_python() -> Path:
    if os.environ.get("MMED_RAG_SKIP_VLLM") == "1":
        pytest.skip("MMED_RAG_SKIP_VLLM=1: the tests against a vLLM server are skipped")
    if VLLM_SKIPPED.is_file():
        pytest.skip(f"{VLLM_SKIPPED.name}: {VLLM_SKIPPED.read_text().strip()}")
    if VLLM_PYTHON.is_file():
        return VLLM_PYTHON
    pytest.fail(
        f"{VLLM_PYTHON} is missing: build vLLM's environment with `make vllm-env` (about 1.5 minutes, 4 GB), "
        f"or set MMED_RAG_SKIP_VLLM=1 to skip the tests that need it"
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A converted tiny LLaVA-Med served by vLLM, the same model in an in-process engine (a subprocess in vLLM's
    environment), phantom VQA records, and ``--backend hf``'s answers to them."""
    python = vllm_python()
    root = tmp_path_factory.mktemp("vllm")
    make_phantoms(PhantomConfig(out=str(root / "data"), n=30, size=48, modalities=("radiology",)))
    vqa = root / "data/test/vqa/radiology_test.jsonl"
    lines = vqa.read_text().splitlines()[:RECORDS]
    assert len(lines) == RECORDS
    vqa.write_text("\n".join(lines) + "\n")
    tiny = save_tiny_llava(root / "tiny", text=SERVABLE_TEXT)
    src, tower = original_llava_med(tiny, root)
    model = convert_llava_med(ConvertConfig(src=str(src), dst=str(root / "model"), vision_tower=str(tower)))
    vocabulary = len(AutoTokenizer.from_pretrained(model))
    server = LocalVLLMServer(python, model, free_port(), root / "server", max_logprobs=vocabulary)
    engine = None
    try:
        server.launch()
        engine = in_process_engine(python, model, vqa, root)
        # The reference answers are computed while the server and the engine start.
        options = dict(
            model=str(model),
            input=str(vqa),
            img_root=str(root / "data/images"),
            modality="radiology",
            no_retrieval=True,
            max_new_tokens=MAX_NEW_TOKENS,
            dtype="float32",
            device="cpu",
            batch_size=4,
        )
        generate(PipelineConfig(**options, output=str(root / "hf.jsonl"), yes_no_scores=True))
        server.wait_healthy(timeout_s=400)
        yield SimpleNamespace(
            root=root,
            model=model,
            vqa=vqa,
            server=server,
            engine=engine,
            options=options,
            hf=list(read_jsonl(root / "hf.jsonl")),
            top_logprobs=vocabulary,
        )
    finally:
        server.stop()
        if engine is not None and engine.poll() is None:
            os.killpg(engine.pid, signal.SIGKILL)
            engine.wait()


def in_process_engine(python: Path, model: Path, vqa: Path, root: Path) -> subprocess.Popen:
    """``--backend vllm`` (tests/vllm_engine_answers.py) in vLLM's environment, writing root/engine.json."""
    workdir = root / "engine"
    (workdir / "tmp").mkdir(parents=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "VLLM_CACHE_ROOT": str(workdir / "cache"),
        "TMPDIR": str(workdir / "tmp"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    command = [str(python), str(Path(__file__).with_name("vllm_engine_answers.py")), str(model), str(vqa)]
    command += [str(root / "data/images"), str(MAX_NEW_TOKENS), str(root / "engine.json")]
    with open(workdir / "log", "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def answers(path: Path) -> dict:
    return {line["question_id"]: line["prediction"] for line in read_jsonl(path)}


def test_convert_output_is_in_the_layout_vllm_serves(served):
    assert served_layout_problem(served.model) is None
    assert httpx.get(served.server.url + "/models").json()["data"][0]["id"] == str(served.model)


def test_openai_backend_gives_the_hf_backends_greedy_answers_and_scores(served, tmp_path):
    output = tmp_path / "openai.jsonl"
    options = {**served.options, "output": str(output), "concurrency": 4, "top_logprobs": served.top_logprobs}
    command = ["generate", "--backend", "openai", "--api-base", served.server.url]
    for name in ("model", "input", "output", "img_root", "modality", "max_new_tokens", "batch_size", "concurrency"):
        command += [f"--{name.replace('_', '-')}", str(options[name])]
    command += ["--top-logprobs", str(options["top_logprobs"]), "--no-retrieval", "--yes-no-scores"]
    assert main(command) == 0  # mmed-rag's entry point
    lines = list(read_jsonl(output))
    hf = {line["question_id"]: line for line in served.hf}
    # Every prompt the server saw was checked against the processor's ids (a mismatch would have failed the run).
    assert [line["prompt"] for line in lines] == [hf[line["question_id"]]["prompt"] for line in lines]
    assert answers(output) == {key: line["prediction"] for key, line in hf.items()}
    differences = [abs(line["yes_probability"] - hf[line["question_id"]]["yes_probability"]) for line in lines]
    assert max(differences) < 1e-4, differences


def test_the_in_process_vllm_backend_gives_the_hf_backends_greedy_answers_and_scores(served):
    try:
        code = served.engine.wait(timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail("the in-process vLLM engine did not finish in 400 s")
    log = (served.root / "engine/log").read_text(errors="replace")
    assert code == 0, log[-3000:]
    result = json.loads((served.root / "engine.json").read_text())
    hf = {line["question_id"]: line for line in served.hf}
    assert result["prompts"] == [hf[key]["prompt"] for key in result["question_ids"]]
    assert result["answers"] == [hf[key]["prediction"] for key in result["question_ids"]]
    expected = [hf[key]["yes_probability"] for key in result["question_ids"]]
    assert result["yes_probabilities"] == pytest.approx(expected, abs=1e-4)


def test_a_server_that_goes_down_stops_the_run_clearly_and_a_rerun_resumes(served, tmp_path):
    proxy = FlakyProxy(served.server.url.removesuffix("/v1"))
    try:
        output = tmp_path / "flaky.jsonl"
        config = PipelineConfig(
            **served.options, output=str(output), backend="openai", api_base=proxy.url, concurrency=4, retries=1
        )
        proxy.passes = 8  # two batches of four, then the "server" is gone
        with pytest.raises(ServerError, match=rf"{proxy.url}/chat/completions gave no answer after 2 attempt.*resumes"):
            generate(config)
        assert not output.exists()
        assert len(list(read_jsonl(partial_path(output)))) == 8

        proxy.passes = None
        summary = generate(config)
        assert summary.resumed == 8 and summary.written == RECORDS
        assert answers(output) == {line["question_id"]: line["prediction"] for line in served.hf}
    finally:
        proxy.close()


def test_a_slow_server_times_out_with_the_url(served):
    proxy = FlakyProxy(served.server.url.removesuffix("/v1"))
    proxy.delay = 3.0
    try:
        generator = load_generator(
            GeneratorConfig(model=str(served.model), backend="openai", api_base=proxy.url, request_timeout=1, retries=1)
        )
        with pytest.raises(ServerError, match=rf"{proxy.url}/chat/completions gave no answer.*ReadTimeout"):
            generator.generate(["<image>\nIs the heart enlarged?"], [[_image(served)]])
    finally:
        proxy.close()


def test_a_server_that_is_down_fails_at_the_start_naming_its_url(served, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    command = ["generate", "--backend", "openai", "--api-base", url, "--model", str(served.model)]
    command += ["--input", str(served.vqa), "--output", str(tmp_path / "out.jsonl"), "--retries", "1"]
    command += ["--img-root", served.options["img_root"], "--modality", "radiology", "--no-retrieval"]
    assert main(command) != 0
    assert f"{url}/models gave no answer after 2 attempt(s) (last: ConnectError" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def _image(served):
    from mmed_rag.data.images import load_image

    return load_image(served.options["img_root"], json.loads(served.vqa.read_text().splitlines()[0])["image"])


# -- without a server ----------------------------------------------------------------------------------------------


def test_backend_options_are_checked():
    with pytest.raises(ConfigError, match="needs --api-base"):
        GeneratorConfig(model="m", backend="openai")
    with pytest.raises(ConfigError, match="merge-lora"):
        PipelineConfig(model="m", no_retrieval=True, backend="openai", api_base="http://x/v1", adapter="a")


def test_the_in_process_vllm_backend_says_how_to_get_vllm_when_it_is_missing(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable here")
    with pytest.raises(GeneratorError, match="vllm cannot be imported here.*make vllm-env.*--backend openai"):
        load_generator(GeneratorConfig(model=str(tmp_path), backend="vllm"))
