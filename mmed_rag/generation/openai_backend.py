"""``--backend openai``: generation by an OpenAI-compatible server (``vllm serve``; SGLang, LMDeploy, TGI alike).

Each prompt is one ``POST {api_base}/chat/completions`` with the prompt's images inline (see
:mod:`mmed_rag.generation.served` for how the prompt is kept identical to ``--backend hf``'s). Up to
``concurrency`` requests are in flight at once, from threads; the server batches them. A request that meets a
connection error, a timeout, HTTP 429 or a 5xx is retried after 1, 2, 4, ... seconds, ``retries`` times; then the
run stops with an error naming the URL. The pipeline has written every finished batch by then, so the same command
resumes once the server answers again.

An API key, where the server wants one (``vllm serve --api-key``), is read from ``OPENAI_API_KEY``, never from a
config file (configs are saved beside outputs).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import httpx
from PIL import Image

from mmed_rag.generation.configs import GeneratorConfig
from mmed_rag.generation.generator import GeneratorError, check_images, load_processor
from mmed_rag.generation.served import ServedGenerator

logger = logging.getLogger(__name__)

RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})
FIRST_BACKOFF_S = 1.0


class ServerError(GeneratorError):
    """A server that does not answer, or refuses a request."""


class _Cancelled(Exception):
    """Another request of the same call failed: this one stops retrying."""


class _Call:
    """The requests of one generate call: a failed one stops the others' retries; each retry round is logged once."""

    def __init__(self):
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._logged: set[int] = set()

    def first_to_retry(self, attempt: int) -> bool:
        with self._lock:
            first = attempt not in self._logged
            self._logged.add(attempt)
            return first


class OpenAIGenerator(ServedGenerator):
    """The :class:`~mmed_rag.generation.generator.Generator` interface over an OpenAI-compatible chat endpoint."""

    def __init__(self, processor, config: GeneratorConfig, client: httpx.Client, model_name: str):
        super().__init__(processor, config)
        self.client = client
        self.base = config.api_base.rstrip("/")
        self.model_name = model_name

    @classmethod
    def load(cls, config: GeneratorConfig) -> OpenAIGenerator:
        """Connect to ``config.api_base``: the server must answer and serve the model (``/models``) now."""
        processor = load_processor(Path(config.model), config.trust_remote_code)
        key = os.environ.get("OPENAI_API_KEY")
        client = httpx.Client(
            timeout=config.request_timeout,
            limits=httpx.Limits(max_connections=config.concurrency),
            headers={"Authorization": f"Bearer {key}"} if key else None,
        )
        generator = cls(processor, config, client, model_name="")
        generator.model_name = generator._served_model()
        if config.batch_size < config.concurrency:
            logger.warning(
                "--batch-size %d < --concurrency %d: the pipeline hands over %d prompts at a time, so no more "
                "requests are in flight; raise --batch-size",
                config.batch_size,
                config.concurrency,
                config.batch_size,
            )
        logger.info(
            "Generating with %s at %s (up to %d requests at once)",
            generator.model_name,
            generator.base,
            config.concurrency,
        )
        return generator

    def _served_model(self) -> str:
        """``api_model`` if the server serves it, else the server's only model."""
        served = self._request("GET", "/models", None, _Call()).get("data", [])
        names = [entry["id"] for entry in served]
        wanted = self.config.api_model
        if wanted is None and len(names) != 1:
            raise ServerError(f"{self.base} serves {len(names)} models ({', '.join(names)}): name one with --api-model")
        if wanted is not None and wanted not in names:
            raise ServerError(f"{self.base} does not serve {wanted!r} (it serves: {', '.join(names) or 'nothing'})")
        name = wanted or names[0]
        root = next(entry.get("root") for entry in served if entry["id"] == name)
        if root and os.path.isdir(root) and not os.path.samefile(root, self.config.model):
            logger.warning(
                "%s serves %s, but --model is %s: prompts are rendered with --model's processor, answers come from "
                "the served model",
                self.base,
                root,
                self.config.model,
            )
        return name

    # -- the Generator interface ----------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> list[str]:
        """One answer per prompt, as :meth:`Generator.generate <mmed_rag.generation.generator.Generator.generate>`."""
        responses = self._ask(prompts, images, max_tokens=self.config.max_new_tokens, logprobs=False)
        return [self.answer(r["choices"][0].get("token_ids"), r["choices"][0]["message"]["content"]) for r in responses]

    def yes_no_probability(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of each prompt's first answer token, from the server's top log-probs."""
        responses = self._ask(prompts, images, max_tokens=1, logprobs=True)
        return [
            self.yes_probability(position, self._first_token_logprobs(position, response))
            for position, response in enumerate(responses)
        ]

    # -- requests -------------------------------------------------------------------------------------------------

    def _ask(self, prompts, images, max_tokens: int, logprobs: bool) -> list[dict]:
        """Send every prompt (``concurrency`` at a time), check each prompt the server saw; responses in order."""
        for position, (prompt, prompt_images) in enumerate(zip(prompts, images, strict=True)):
            check_images(position, prompt, prompt_images)
        bodies = [
            self._body(position, prompt, prompt_images, max_tokens, logprobs)
            for position, (prompt, prompt_images) in enumerate(zip(prompts, images, strict=True))
        ]
        responses = self._post_all(bodies)
        for position, (prompt, prompt_images, response) in enumerate(zip(prompts, images, responses, strict=True)):
            self.check_prompt(position, prompt, prompt_images, response.get("prompt_token_ids"))
        return responses

    def _body(self, position: int, prompt: str, images, max_tokens: int, logprobs: bool) -> dict:
        config = self.config
        body = {
            "model": self.model_name,
            "messages": self.messages(prompt, images),
            "max_tokens": max_tokens,
            "temperature": config.temperature if config.do_sample else 0.0,
            # vLLM's extensions (other servers ignore them): BOS as the processor's tokenizer adds it, and the
            # prompt's and answer's token ids, to check the prompt and decode the answer locally.
            "add_special_tokens": True,
            "return_token_ids": True,
        }
        if config.do_sample:
            body |= {"top_p": config.top_p, "seed": config.seed + position}
        if config.stop_strings:
            body["stop"] = list(config.stop_strings)
        if logprobs:
            body |= {"logprobs": True, "top_logprobs": self.top_logprobs, "return_tokens_as_token_ids": True}
        return body

    def _post_all(self, bodies: list[dict]) -> list[dict]:
        """POST every body to the chat endpoint, up to ``concurrency`` at once; the first failure stops the rest."""
        if not bodies:
            return []
        call = _Call()
        pool = ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(bodies)), thread_name_prefix="openai")
        try:
            futures = [pool.submit(self._request, "POST", "/chat/completions", body, call) for body in bodies]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f.exception() for f in futures if f.done() and f.exception() is not None]
            if failed:
                call.stop.set()
                raise next((error for error in failed if not isinstance(error, _Cancelled)), failed[0])
            return [future.result() for future in futures]
        finally:
            call.stop.set()
            # Requests still in flight end on their own (within request_timeout); none is started any more.
            pool.shutdown(wait=False, cancel_futures=True)

    def _request(self, method: str, path: str, body: dict | None, call: _Call) -> dict:
        """One request, retried with exponential back-off on failures a server recovers from."""
        url = self.base + path
        problem = ""
        for attempt in range(self.config.retries + 1):
            if attempt:
                delay = FIRST_BACKOFF_S * 2 ** (attempt - 1)
                if call.first_to_retry(attempt):
                    logger.warning("%s: %s; retry %d/%d in %.0f s", url, problem, attempt, self.config.retries, delay)
                if call.stop.wait(delay):
                    raise _Cancelled(url)
            try:
                response = self.client.request(method, url, json=body)
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {error or 'no details'}"
                continue
            if response.status_code < 400:
                try:
                    return response.json()
                except ValueError:
                    raise ServerError(f"{url} answered without JSON: {response.text[:200]!r}") from None
            problem = f"HTTP {response.status_code}: {_server_message(response)}"
            if response.status_code not in RETRIED_STATUS:
                raise ServerError(f"{url} refused the request ({problem})")
        raise ServerError(
            f"{url} gave no answer after {self.config.retries + 1} attempt(s) (last: {problem}). Is the server "
            f"running and serving the model? Once it answers, run the same command again: the batches already "
            f"written are kept and the run resumes"
        )

    def _first_token_logprobs(self, position: int, response: dict) -> dict[int, float]:
        """The answer's first-token top log-probs by token id (vLLM names tokens ``token_id:N`` when asked)."""
        try:
            entries = response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            return {int(entry["token"].removeprefix("token_id:")): entry["logprob"] for entry in entries}
        except (KeyError, IndexError, TypeError, ValueError):
            raise GeneratorError(
                f"prompt {position}: {self.base} returned no first-token log-probs by token id (vLLM's "
                f"return_tokens_as_token_ids); yes/no scores over a server need vLLM, or use --backend hf"
            ) from None


def _server_message(response: httpx.Response) -> str:
    """The error message an OpenAI-compatible server puts in its body, else the body's start."""
    try:
        error = response.json().get("error", {})
        return str(error.get("message", error) if isinstance(error, dict) else error)[:500]
    except (ValueError, AttributeError):
        return response.text[:500]
