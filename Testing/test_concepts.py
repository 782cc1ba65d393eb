"""Concept attributes: geometric known answers, real anatomy, LMM backends (tiny LLaVA, local HTTP server), cache."""
from __future__ import annotations

import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from cotexnet.concepts import (
    ATTRIBUTES, TEMPLATE, ConceptCache, describe, format_summary, get_backend, summarize_dataset,
)
from cotexnet.concepts import geometric
from cotexnet.concepts.http import OpenAIBackend
from cotexnet.concepts.lmm import LMMBackend
from cotexnet.concepts.vocabulary import validate
from cotexnet.errors import ConfigError, DataError

SIZE = 352
PROMPT = re.compile(
    r"^(one|two|three|four|five|multiple) (round|oval|elongated|irregular|ring-shaped) (tiny|small|medium|large) "
    r"(\w+) (.+) area, located in the ([a-z ]+) of the image\.$"
)


def ellipse(shape=(SIZE, SIZE), center=(176, 176), axes=(40, 40), angle=0.0) -> np.ndarray:
    """Boolean (y, x) ellipse with semi-axes ``axes`` (along x, along y before rotation by ``angle``)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    y, x = yy - center[0], xx - center[1]
    u = np.cos(angle) * x + np.sin(angle) * y
    v = -np.sin(angle) * x + np.cos(angle) * y
    return (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1


def gray_image(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 3.0, (SIZE, SIZE)).astype(np.float32)


def one(image, mask, **kwargs) -> dict:
    return describe(image, mask.astype(np.uint8), ["polyp"], **kwargs)[0]


# --- geometric known answers -------------------------------------------------------------------


def test_disk_is_round_and_prompt_follows_the_template():
    record = one(gray_image(), ellipse(axes=(30, 30)))
    assert (record["count"], record["number"], record["shape"]) == (1, "one", "round")
    assert record["prompt"] == TEMPLATE.format(
        number="one", shape="round", size="small", color="gray", keyword="polyp", location="center"
    )
    assert set(record["sources"].values()) == {"geometric"} and record["reasons"] == {}


@pytest.mark.parametrize("ratio, expected", [(3.0, "elongated"), (1.5, "oval")])
def test_ellipse_shape_follows_the_documented_axis_ratio_rule(ratio, expected):
    mask = ellipse(axes=(20 * ratio, 20), angle=0.6)  # tilted: the rule uses principal axes, not the grid
    record = one(gray_image(), mask)
    assert record["measures"]["axis_ratio"] == pytest.approx(ratio, rel=0.03)
    assert record["measures"]["ellipse_fit"] >= geometric.IRREGULAR_FIT
    assert record["shape"] == expected  # oval below OVAL_MAX_RATIO (2.0), elongated from it


def test_star_is_irregular_and_annulus_ring_shaped():
    yy, xx = np.mgrid[:SIZE, :SIZE]
    radius, theta = np.hypot(yy - 176, xx - 176), np.arctan2(yy - 176, xx - 176)
    assert one(gray_image(), radius < 40 * (1 + 0.5 * np.cos(5 * theta)))["shape"] == "irregular"
    assert one(gray_image(), (radius < 50) & (radius > 35))["shape"] == "ring-shaped"


def test_two_blobs_give_two_and_specks_are_not_counted():
    mask = ellipse(center=(100, 100), axes=(20, 20)) | ellipse(center=(250, 250), axes=(25, 15))
    assert one(gray_image(), mask)["number"] == "two"
    mask[10, 300] = True  # one-pixel annotation noise
    record = one(gray_image(), mask)
    assert (record["count"], record["number"], record["measures"]["components"]) == (2, "two", 3)
    bars = np.zeros((SIZE, SIZE), bool)
    for i in range(7):
        bars[20 + 45 * i: 50 + 45 * i, 100:130] = True
    assert one(gray_image(), bars)["number"] == "multiple"


@pytest.mark.parametrize(
    "center, expected",
    [
        ((50, 50), "top left"), ((50, 176), "top"), ((176, 300), "right"), ((176, 176), "center"),
        ((300, 300), "bottom right"),
    ],
)
def test_location_on_a_3x3_grid(center, expected):
    assert one(gray_image(), ellipse(center=center, axes=(15, 15)))["location"] == expected


def test_size_thresholds():
    fractions = {}
    for radius, expected in [(5, "tiny"), (30, "small"), (60, "medium"), (120, "large")]:
        record = one(gray_image(), ellipse(axes=(radius, radius)))
        fractions[expected] = record["measures"]["fraction"]
        assert record["size"] == expected
    assert fractions["tiny"] < 0.01 <= fractions["small"] < 0.05 <= fractions["medium"] < 0.2 <= fractions["large"]


def test_red_on_gray_is_red_and_other_named_colors():
    mask = ellipse(axes=(40, 40))
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    image[mask] = (255, 0, 0)
    assert one(image, mask)["color"] == "red"
    named = {(0.1, 0.7, 0.2): "green", (0.5, 0.3, 0.1): "brown", (0.95, 0.95, 0.95): "white",
             (0.05, 0.05, 0.05): "black", (0.9, 0.6, 0.7): "pink", (0.2, 0.3, 0.8): "blue"}
    assert {rgb: geometric.name_rgb(*rgb) for rgb in named} == named


def test_grayscale_color_is_relative_to_the_surroundings():
    mask = ellipse(axes=(40, 40))
    dark, bright = gray_image(), gray_image()
    dark[mask], bright[mask] = 40.0, 160.0
    dark[:, :20] = 0.0  # air/padding elsewhere does not change the comparison
    assert one(dark, mask)["color"] == "dark"
    assert one(bright, mask)["color"] == "bright"
    # An ultrasound frame saved as RGB (equal channels) is grayscale, not "gray" by hue.
    assert one(np.repeat(dark[..., None], 3, -1).clip(0, 255).astype(np.uint8), mask)["color"] == "dark"


def test_absent_class_has_number_zero_and_an_absence_prompt():
    labels = ellipse(axes=(20, 20)).astype(np.uint8)
    polyp, tumour = describe(gray_image(), labels, ["polyp", "tumour"], keywords=["polyp", "tumor"])
    assert polyp["count"] == 1 and tumour["label"] == 2
    assert (tumour["count"], tumour["number"], tumour["shape"], tumour["location"]) == (0, "no", None, None)
    assert tumour["prompt"] == "no tumor area in the image."


@pytest.mark.parametrize("left_out", ATTRIBUTES)
def test_each_attribute_can_be_left_out(left_out):
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    mask = ellipse(center=(50, 50), axes=(30, 30))
    image[mask] = (255, 0, 0)
    full = one(image, mask)["prompt"]
    assert full == "one round small red polyp area, located in the top left of the image."
    record = one(image, mask, attributes=[a for a in ATTRIBUTES if a != left_out])
    removed = {"number": "one ", "shape": "round ", "size": "small ", "color": "red ", "keyword": "polyp ",
               "location": ", located in the top left of the image"}[left_out]
    assert record["prompt"] == full.replace(removed, "", 1)
    if left_out != "keyword":
        assert record[left_out] is None and left_out not in record["sources"]
    with pytest.raises(ConfigError, match="unknown texture"):
        one(image, mask, attributes=["shape", "texture"])


def test_invalid_inputs_name_the_problem():
    with pytest.raises(DataError, match=r"image shape \(10, 12\) does not match label map shape \(10, 11\)"):
        describe(np.zeros((10, 12)), np.zeros((10, 11), np.uint8), ["a"])
    with pytest.raises(DataError, match="spacing: expected 3 positive numbers"):
        describe(np.zeros((4, 5, 6)), np.zeros((4, 5, 6), np.uint8), ["a"], spacing=(1, 0, 1))
    with pytest.raises(ConfigError, match="one keyword per class"):
        describe(np.zeros((4, 5)), np.zeros((4, 5), np.uint8), ["a", "b"], keywords=["x"])
    with pytest.raises(ConfigError, match="backend: expected one of geometric, llava, openai"):
        get_backend("gpt")
    with pytest.raises(ConfigError, match="backend 'openai'"):
        get_backend("openai", model="m", colour="red")


# --- 3D ----------------------------------------------------------------------------------------

LPS_FLIP_X = (-1, 0, 0, 0, 1, 0, 0, 0, 1)


def test_left_sided_3d_blob_is_left_whatever_the_storage_direction():
    shape = (30, 40, 50)  # (z, y, x)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    spacing = (0.8, 0.8, 2.0)  # (x, y, z) mm: a 6 mm ball spans 15 voxels in x and y, 6 in z
    blob = (((zz - 15) * 2.0) ** 2 + ((yy - 20) * 0.8) ** 2 + ((xx - 40) * 0.8) ** 2 <= 36).astype(np.uint8)
    volume = np.where(blob > 0, 200.0, 50.0).astype(np.float32)
    # Identity direction: +x index is the patient's left (LPS). Flipped x: the same anatomy stored mirrored.
    stored = describe(volume, blob, ["lesion"], spacing=spacing)[0]
    mirrored = describe(volume[..., ::-1], blob[..., ::-1], ["lesion"], spacing=spacing, direction=LPS_FLIP_X)[0]
    assert stored["location"] == mirrored["location"] == "left"
    assert stored["shape"] == "round" and stored["color"] == "bright" and stored["number"] == "one"
    # Read with 1 mm voxels the same ball is squashed in z: longest over shortest axis 2.5.
    assert describe(volume, blob, ["lesion"])[0]["shape"] == "elongated"
    # A mirrored array read with the identity direction is on the right.
    assert describe(volume[..., ::-1], blob[..., ::-1], ["lesion"], spacing=spacing)[0]["location"] == "right"
    corner = np.zeros(shape, np.uint8)
    corner[24:28, 3:7, 3:7] = 1  # high z (superior), low y (anterior), low x (right)
    assert describe(volume, corner, ["lesion"], spacing=spacing)[0]["location"] == "right anterior superior"


@pytest.fixture(scope="module")
def mni152():
    """MNI152 T1 and its grey/white-matter label map (nilearn's wheel), in the geometry SimpleITK reads."""
    from cotexnet.demo import mni152_volumes

    return mni152_volumes(resolution=2)


def test_mni152_grey_and_white_matter(mni152):
    image, label_map = mni152
    t1, labels, spacing, direction = image.array, label_map.array, image.spacing, image.direction
    assert np.allclose(direction, (-1, 0, 0, 0, -1, 0, 0, 0, 1))  # nilearn's RAS grid, read as LPS
    gm, wm = describe(t1, labels, ["grey matter", "white matter"], spacing=spacing, direction=direction)
    for record in (gm, wm):
        match = PROMPT.match(record["prompt"])
        assert match, record["prompt"]
        assert match.group(5) == record["keyword"] and record["location"] == "center"
        assert record["count"] >= 1 and record["color"] in ("dark", "gray", "bright")
        assert record["shape"] == "irregular"  # a folded cortex and a branching white matter
    assert wm["measures"]["fraction"] < gm["measures"]["fraction"]
    # The left hemisphere alone (RAS x < 0, i.e. the first half of nilearn's i axis) is on the left.
    left = labels.copy()
    left[..., labels.shape[2] // 2:] = 0
    left_gm = describe(t1, left, ["grey matter", "white matter"], spacing=spacing, direction=direction)[0]
    assert left_gm["location"] == "left"
    # An axial slice is a 2D image too: the cortex rings the white matter.
    k = labels.shape[0] // 2
    slice_gm, slice_wm = describe(t1[k], labels[k], ["grey matter", "white matter"])
    assert PROMPT.match(slice_gm["prompt"]) and PROMPT.match(slice_wm["prompt"])
    assert slice_gm["shape"] == "ring-shaped" and slice_wm["color"] == "bright"


# --- cache -------------------------------------------------------------------------------------


def test_cache_hit_miss_and_corrupt_line(tmp_path):
    path = tmp_path / "concepts.jsonl"
    image, labels = gray_image(), ellipse(axes=(30, 30)).astype(np.uint8)
    cache = ConceptCache(path)
    first = describe(image, labels, ["polyp"], cache=cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    assert describe(image, labels, ["polyp"], cache=cache) == first
    assert cache.hits == 1
    # A different attribute set, mask or class is a different key.
    describe(image, labels, ["polyp"], cache=cache, attributes=["shape", "keyword"])
    describe(image, labels * 0, ["polyp"], cache=cache)
    assert (cache.misses, len(cache)) == (3, 3)
    # A crash mid-line and a hand edit: both lines are skipped with a warning, the rest reused.
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"key": "x", "record": {"count"')
    with pytest.warns(UserWarning, match=r"concepts.jsonl:4: skipped a corrupt concept-cache line"):
        describe(image, labels, ["polyp"], keywords=["lesion"], cache=path)  # appends after the broken line
    with path.open("a", encoding="utf-8") as handle:
        handle.write("not json\n")
    with pytest.warns(UserWarning) as caught:
        reloaded = ConceptCache(path)
    assert [re.search(r"jsonl:(\d+): skipped", str(w.message)).group(1) for w in caught] == ["4", "6"]
    assert len(reloaded) == 4
    assert describe(image, labels, ["polyp"], cache=reloaded) == first
    assert (reloaded.hits, reloaded.misses) == (1, 0)


def test_summarize_dataset_counts_words_and_fills_the_cache(tmp_path):
    red = np.full((SIZE, SIZE, 3), 128, np.uint8)
    disk = ellipse(center=(50, 50), axes=(30, 30))
    red[disk] = (255, 0, 0)
    cases = [
        ("a", red, disk.astype(np.uint8), None, None),
        ("b", gray_image(), (ellipse(axes=(60, 20)) * 2).astype(np.uint8), None, None),
        ("c", gray_image(), np.zeros((SIZE, SIZE), np.uint8), None, None),
    ]
    summary = summarize_dataset(cases, None, ["polyp", "vessel"], cache=tmp_path / "c.jsonl", progress=False)
    assert summary["cases"] == 3 and summary["backend"] == "geometric"
    assert summary["values"]["shape"] == {"round": 1, "elongated": 1}
    assert summary["classes"]["polyp"] == {
        "present": 1, "absent": 2,
        "values": {"number": {"one": 1}, "shape": {"round": 1}, "size": {"small": 1}, "color": {"red": 1},
                   "location": {"top left": 1}},
    }
    assert summary["cache"]["misses"] == 6
    again = summarize_dataset(cases, ["polyp", "vessel"], ["polyp", "vessel"], cache=tmp_path / "c.jsonl",
                              progress=False)
    assert (again["cache"]["hits"], again["cache"]["misses"]) == (6, 0) and again["values"] == summary["values"]
    table = format_summary(summary)
    assert "Concept attributes of 3 case(s), backend geometric" in table
    assert re.search(r"shape\s+round\s+1\s+0\s+1", table) and re.search(r"absent\s+2\s+2\s+4", table)
    json.dumps(summary)
    broken = [("case_007", gray_image(), np.zeros((5, 5), np.uint8), None, None)]
    with pytest.raises(DataError, match=r"^case_007: image shape"):
        summarize_dataset(broken, None, ["polyp"], progress=False)


# --- LMM answers: parsing, validation, retries, fallback ---------------------------------------


class ScriptedBackend(LMMBackend):
    """Answers from a list, one per request, so the shared LMM logic runs without a model."""

    name = "scripted"

    def __init__(self, answers, retries=2):
        super().__init__("script", retries=retries, backoff=0.0)
        self.answers, self.questions = list(answers), []

    def ask(self, image, question, temperature):
        self.questions.append((image, question, temperature))
        return self.answers.pop(0)


def red_blob():
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    mask = ellipse(center=(60, 60), axes=(30, 30))
    image[mask] = (255, 0, 0)
    return image, mask.astype(np.uint8)


@pytest.mark.parametrize(
    "field, answer, grayscale, expected",
    [
        ("location", "upper-left corner", False, "top left"),
        ("location", "centre-left", False, "left"),
        ("location", "lower right part of the image", False, "bottom right"),
        ("location", "top bottom", False, None),
        ("location", "", False, None),
        ("shape", "Elliptical", False, "oval"),
        ("size", "big", False, "large"),
        ("color", "Grey", False, "gray"),
        ("color", "white", True, "bright"),
        ("color", "red", True, None),  # grayscale images take dark/gray/bright only
        ("number", "two", False, "two"),
        ("number", 2.0, False, "two"),
        ("number", 0, False, None),
        ("number", "a few", False, None),
        ("shape", 3, False, None),
    ],
)
def test_lmm_words_are_mapped_onto_the_vocabulary(field, answer, grayscale, expected):
    word, note = validate(field, answer, count=3, grayscale=grayscale)
    assert word == expected and (word is not None or note)


def test_lmm_answers_are_normalized_capped_retried_and_fall_back(caplog):
    image, labels = red_blob()
    backend = ScriptedBackend([
        'Sure! {"Number": 3, "shape": "circular", "size": "huge", "color": "reddish", "location": "upper-left corner"}',
    ])
    record = describe(image, labels, ["polyp"], backend=backend)[0]
    assert (record["number"], record["shape"], record["size"], record["color"], record["location"]) == (
        "one", "round", "large", "red", "top left")
    assert set(record["sources"].values()) == {"scripted"}
    assert record["reasons"] == {"number": "number 3 capped at the 1 connected component(s) of the mask"}
    roi, question, temperature = backend.questions[0]
    assert roi.shape == (SIZE, SIZE, 3) and roi[300, 300].tolist() == [0, 0, 0] and roi[60, 60].tolist() == [255, 0, 0]
    assert '"shape": one of round, oval, elongated, irregular, ring-shaped' in question and temperature == 0.0

    backend = ScriptedBackend(['{"shape": "hexagonal", "size": "small"}', "no idea", '{"shape": "star"}'])
    with caplog.at_level(logging.WARNING, logger="cotexnet.concepts"):
        record = describe(image, labels, ["polyp"], backend=backend, attributes=["shape", "size", "keyword"])[0]
    assert [q[2] for q in backend.questions] == [0.0, 0.7, 0.7]  # greedy first, then sampled retries
    assert record["size"] == "small" and record["sources"] == {"shape": "geometric", "size": "scripted"}
    assert record["shape"] == "round"  # geometric fallback
    assert record["reasons"]["shape"].startswith("shape 'star' is not one of: round")
    assert "kept the geometric value 'round'" in record["reasons"]["shape"] and "shape" in caplog.text


# --- LLaVA backend on a tiny random model ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A random-init LLaVA (tiny CLIP vision tower + tiny Llama) with an offline CLIP tokenizer, saved to disk."""
    torch = pytest.importorskip("torch")
    from transformers import (
        CLIPImageProcessor, CLIPTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig,
        LlavaForConditionalGeneration, LlavaProcessor,
    )
    from cotexnet.prompts import offline_clip_tokenizer_dir

    directory = tmp_path_factory.mktemp("tiny-llava")
    tokenizer = CLIPTokenizer.from_pretrained(str(offline_clip_tokenizer_dir()))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<|endoftext|>"})
    side, patch = 30, 15
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=side,
            patch_size=patch, projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=(side // patch) ** 2,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_llava_garbage_answers_fall_back_to_geometric(tiny_llava, caplog):
    image, labels = red_blob()
    with caplog.at_level(logging.WARNING, logger="cotexnet.concepts"):
        record = describe(
            image, labels, ["polyp"], backend="llava", model=str(tiny_llava), device="cpu", local_files_only=True,
            max_new_tokens=8, retries=1,
        )[0]
    geometric_record = describe(image, labels, ["polyp"])[0]
    for field in ("number", "shape", "size", "color", "location"):
        assert record[field] == geometric_record[field]
        assert record["sources"][field] == "geometric"
        assert "(after 2 tries)" in record["reasons"][field]
    assert record["prompt"] == geometric_record["prompt"]
    assert f"llava:{tiny_llava}" in caplog.text


# --- OpenAI-compatible HTTP backend against a local server -------------------------------------

VALID = {"number": 1, "shape": "oval", "size": "medium", "color": "pink", "location": "top-left"}
SECRET = "sk-test-not-a-real-key-0123"


class _Handler(BaseHTTPRequestHandler):
    """Answers by path prefix: /valid, /prose (not JSON), /error (HTTP 500 echoing the auth header),
    /badbody (invalid response JSON), /slow (longer than the client's timeout)."""

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        route = self.path.split("/")[1]
        server.requests.append((route, self.headers.get("Authorization"), body))
        if route == "slow":
            server.stop.wait(2.0)
        if route == "error":
            self._send(500, f"internal error for {self.headers.get('Authorization')}".encode())
            return
        content = {"valid": json.dumps(VALID), "prose": "The polyp looks {roundish} and reddish.", "slow": "{}"}
        reply = json.dumps({"choices": [{"message": {"content": content.get(route)}}]}).encode()
        self._send(200, b"{not json" if route == "badbody" else reply)

    def _send(self, code, payload):
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def llm_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads, server.block_on_close = True, False
    server.requests, server.stop = [], threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.stop.set()
    server.shutdown()
    server.server_close()


def test_http_backend_valid_json(llm_server, monkeypatch):
    server, url = llm_server
    monkeypatch.setenv("COTEXNET_TEST_KEY", SECRET)
    image, labels = red_blob()
    record = describe(image, labels, ["polyp"], backend="openai", model="llava:13b", base_url=f"{url}/valid/v1",
                      api_key_env="COTEXNET_TEST_KEY", timeout=5)[0]
    words = (record["shape"], record["size"], record["color"], record["location"])
    assert words == ("oval", "medium", "pink", "top left")
    assert set(record["sources"].values()) == {"openai"} and record["reasons"] == {}
    assert len(server.requests) == 1
    route, authorization, body = server.requests[0]
    assert authorization == f"Bearer {SECRET}" and body["model"] == "llava:13b" and body["temperature"] == 0.0
    parts = body["messages"][0]["content"]
    assert parts[0]["type"] == "text" and parts[1]["image_url"]["url"].startswith("data:image/png;base64,iVBOR")


@pytest.mark.parametrize(
    "route, reason",
    [
        ("prose", "no JSON object in the answer"),
        ("badbody", "unreadable reply from http://127.0.0.1"),
        ("error", "HTTP 500 from http://127.0.0.1"),
        ("slow", "within 0.3 s"),
    ],
)
def test_http_backend_failures_fall_back_with_reasons_and_never_leak_the_key(
    llm_server, monkeypatch, caplog, route, reason
):
    server, url = llm_server
    monkeypatch.setenv("COTEXNET_TEST_KEY", SECRET)
    image, labels = red_blob()
    backend = get_backend("openai", model="m", base_url=f"{url}/{route}/v1", api_key_env="COTEXNET_TEST_KEY",
                          timeout=0.3, retries=1, backoff=0.0)
    assert SECRET not in repr(backend)
    with caplog.at_level(logging.WARNING, logger="cotexnet.concepts"):
        record = describe(image, labels, ["polyp"], backend=backend)[0]
    assert len(server.requests) == 2  # one try and one retry, no more
    assert set(record["sources"].values()) == {"geometric"}
    assert all(reason in text for text in record["reasons"].values()), record["reasons"]
    assert record["prompt"] == describe(image, labels, ["polyp"])[0]["prompt"]
    assert SECRET not in json.dumps(record) and SECRET not in caplog.text
    if route == "error":
        assert "Bearer ***" in record["reasons"]["shape"]  # the server echoed the key: redacted


def test_unreachable_lmm_is_never_cached_as_its_answer_and_is_asked_again_next_run(llm_server, tmp_path):
    """Fault: an unreachable server's geometric fallback was cached under the LMM's name for good."""
    server, url = llm_server
    image, labels = red_blob()
    cache_path = tmp_path / "concepts.jsonl"
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"

    class Switchable(OpenAIBackend):  # one backend identity (cache key), a server that comes back later
        def __init__(self, base_url):
            super().__init__("llava:13b", base_url=base_url, timeout=2, retries=1, backoff=0.0)
            self.asked = 0

        def ask(self, *args):
            self.asked += 1
            return super().ask(*args)

    down = Switchable(dead_url)
    cache = ConceptCache(cache_path)
    record = describe(image, labels, ["polyp"], backend=down, cache=cache)[0]
    assert record["provisional"] and set(record["sources"].values()) == {"geometric"}
    assert "cannot reach" in record["reasons"]["shape"] and down.asked == 2
    assert describe(image, labels, ["polyp"], backend=down, cache=cache)[0]["provisional"]
    assert down.asked == 2  # this run reuses the stand-in instead of hammering a dead server
    assert not cache_path.exists() or cache_path.read_text() == ""  # nothing written under the LMM's name

    up = Switchable(f"{url}/valid/v1")  # a later run, the server back
    record = describe(image, labels, ["polyp"], backend=up, cache=ConceptCache(cache_path))[0]
    assert up.asked == 1 and not record["provisional"] and set(record["sources"].values()) == {"openai"}
    again = ConceptCache(cache_path)
    assert describe(image, labels, ["polyp"], backend=up, cache=again)[0] == record and again.hits == 1
    assert up.asked == 1

    # An answer the model did give (prose, no JSON) is its answer: cached, not provisional.
    prose = Switchable(f"{url}/prose/v1")
    record = describe(image, labels, ["polyp"], backend=prose, cache=tmp_path / "prose.jsonl")[0]
    assert not record["provisional"] and len(ConceptCache(tmp_path / "prose.jsonl")) == 1
    summary = summarize_dataset([("case", image, labels, None, None)], ["polyp"], ["polyp"], backend=down,
                                cache=tmp_path / "down.jsonl", progress=False)
    assert summary["provisional"] == 1 and "asked again next run" in format_summary(summary)


def test_lmm_backends_describe_volumes_geometrically():
    backend = ScriptedBackend([])
    volume = np.zeros((8, 9, 10), np.float32)
    labels = np.zeros((8, 9, 10), np.uint8)
    labels[2:5, 2:5, 2:5] = 1
    record = describe(volume, labels, ["lesion"], backend=backend)[0]
    assert backend.questions == [] and set(record["sources"].values()) == {"geometric"}
    assert record["reasons"]["shape"] == "scripted describes 2D images only; volumes are described geometrically"
