"""``saescope browse`` under concurrent "type a text" requests: a real server on 127.0.0.1 shares one model
between its request threads. Every answer must be HTTP 200 with the latents of its own text, equal to an
independent single-threaded computation (Hugging Face's ``output_hidden_states`` + the SAE's encoder), and the
server runs one forward pass of the model at a time.

To make the race certain rather than likely, a torch global hook holds every forward pass at block 0 until
all the requests are inside the model (a bounded wait, once): without the server's lock every request's hooks
are then on the shared modules at the same time."""

from __future__ import annotations

import random
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from dash_helpers import WORDS, make_model, make_sae, make_tokenizer

from saescope.browse import make_server

LAYER = 1  # of 3: the server's forward pass is stopped after block 1
SITE = f"resid_post/layer_{LAYER}"
N = 12
TOP = 5  # latents shown per token (BrowseApp.analyze's default)
ROW = re.compile(r"<tr><td>(\d+)</td><td class='l'><code class='token'>(.*?)</code></td><td class='l'>(.*?)</td></tr>")
LATENT = re.compile(r">#(\d+)</a> (\S+)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browse_concurrency")
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=3, layers=3)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    sae = make_sae(32, 40, SITE, model_name=str(tmp / "model"), seed=5)
    with torch.no_grad():
        sae.threshold.fill_(0.05)  # each token fires several latents (its resid_post norm is ~0.1)
    sae.save(tmp / "run" / "suite" / "resid_post" / f"layer_{LAYER}" / "width_40" / "average_l0_10")
    return tmp / "run", model, tokenizer, sae


@pytest.fixture(scope="module")
def server(run):
    srv = make_server(run[0], port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    host, port = srv.server_address[:2]
    yield f"http://{host}:{port}"
    srv.shutdown()
    srv.server_close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _analyze(server: str, text: str) -> tuple[int, str]:
    return _get(f"{server}/sae/0/analyze?text={urllib.parse.quote(text)}")


def _latents_shown(body: str) -> list[tuple[str, list[tuple[int, float]]]]:
    table = body[body.index("<table id='tokens'>"):]
    return [(token, [(int(i), float(v)) for i, v in LATENT.findall(cells)]) for _, token, cells in ROW.findall(table)]


def _expected(model, tokenizer, sae, text: str) -> list[tuple[str, list[tuple[int, float]]]]:
    """The top latents of each token, single-threaded, from Hugging Face's own hidden states."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        x = model(ids, output_hidden_states=True).hidden_states[LAYER + 1][0]  # [0] is the embeddings
        f = sae.encode(x)
    rows = []
    for t in range(ids.shape[1]):
        values, idx = f[t].topk(TOP)
        rows.append((tokenizer.convert_ids_to_tokens(int(ids[0, t])),
                     [(int(i), float(v)) for i, v in zip(idx, values) if v > 0]))
    return rows


class _Gate:
    """Torch global hooks: hold each forward pass at block 0 until ``n`` are inside the model (at most
    ``patience`` seconds, once), and count the forward passes between block 0 and block ``LAYER``."""

    def __init__(self, n: int, patience: float = 5.0) -> None:
        self.n, self.patience = n, patience
        self.arrived = self.in_flight = self.most_in_flight = 0
        self.gave_up = False
        self.cond = threading.Condition()

    @staticmethod
    def _layer(module) -> int | None:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return module.self_attn.layer_idx if isinstance(module, LlamaDecoderLayer) else None

    def enter(self, module, _args) -> None:
        if self._layer(module) != 0:
            return
        with self.cond:
            self.arrived += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.cond.notify_all()
            if not self.gave_up and not self.cond.wait_for(lambda: self.arrived >= self.n, self.patience):
                self.gave_up = True

    def leave(self, module, _args, _output) -> None:  # global hooks run before the module's own (the stop)
        if self._layer(module) == LAYER:
            with self.cond:
                self.in_flight -= 1


def test_concurrent_texts_each_get_their_own_latents(run, server):
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    _, model, tokenizer, sae = run
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(4 + i)) for i in range(N)]
    expected = [_expected(model, tokenizer, sae, text) for text in texts]
    assert sum(len(latents) for rows in expected for _, latents in rows) > 3 * sum(map(len, expected))
    # one request first: the server loads the SAE and the model before the burst
    status, body = _analyze(server, texts[0])
    assert status == 200, body
    gate = _Gate(N)
    handles = [register_module_forward_pre_hook(gate.enter), register_module_forward_hook(gate.leave)]
    try:
        with ThreadPoolExecutor(N) as pool:
            answers = list(pool.map(lambda text: _analyze(server, text), texts))
    finally:
        for handle in handles:
            handle.remove()
    errors = [(text, status, re.findall(r"<p class='error'>(.*?)</p>", body)) for text, (status, body)
              in zip(texts, answers) if status != 200]
    assert not errors, errors
    assert gate.arrived == N
    assert gate.most_in_flight == 1  # the server's lock: one forward pass of the shared model at a time
    for text, want, (_, body) in zip(texts, expected, answers):
        got = _latents_shown(body)
        assert [token for token, _ in got] == [token for token, _ in want] == text.split()
        for (token, have), (_, should) in zip(got, want):
            assert [i for i, _ in have] == [i for i, _ in should], (text, token)
            for (_, a), (_, b) in zip(have, should):  # shown with 3 significant digits
                assert a == pytest.approx(b, rel=6e-3, abs=1e-6), (text, token)


def test_a_model_that_skips_the_site_still_gets_the_layout_message(run, server):
    """A genuine layout mismatch (the forward pass ends before block LAYER) is still reported as one."""
    from torch.nn.modules.module import register_module_forward_pre_hook
    from transformers.models.llama.modeling_llama import LlamaModel

    configs = []

    def run_one_block(module, _args) -> None:
        if isinstance(module, LlamaModel):
            configs.append((module.config, module.config.num_hidden_layers))
            module.config.num_hidden_layers = 1

    handle = register_module_forward_pre_hook(run_one_block)
    try:
        status, body = _analyze(server, "the cat sat")
    finally:
        handle.remove()
        for config, layers in configs:
            config.num_hidden_layers = layers
    assert configs and status == 400
    assert f"never reached {SITE}: it ran to its end" in body
    assert "LlamaForCausalLM may not follow the llama layout" in body
    assert _analyze(server, "the cat sat")[0] == 200
