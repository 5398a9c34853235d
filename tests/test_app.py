"""The web app's logic without a browser (m3d_jax.app.session, viewer): upload checks and their messages,
answers with a box and with a [SEG] mask on a tiny seg-enabled LaMed, sessions kept apart, and a Med-2E3
answer's slice scores, plot and slice clicks on a tiny random Med-2E3."""

from __future__ import annotations

import io
import threading
import time
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch

from m3d_jax import render
from m3d_jax.app import viewer
from m3d_jax.app.session import Limits, Service, UploadError, load_upload, phantom_examples
from m3d_jax.data.phantoms import write_phantoms
from m3d_jax.errors import InputError
from m3d_jax.generate import SamplingConfig
from m3d_jax.inference import Answerer, InputBox
from test_med2e3_tools import phantom_med2e3  # noqa: F401 (a fixture: the phantom-config Med-2E3 folder)

# The scripted model's bigram chain (word tokenizer ids: w<i> = i, </s> = 2, [SEG] = 259): a question ending in
# w9 is answered "w10 w11 [SEG]" (a [SEG] after the first new token, so its hidden state prompts the mask
# decoder); one ending in w7 is answered "w8".
SEG_QUESTION, SEG_ANSWER = "w5 w9", "w10 w11 [SEG]"
PLAIN_QUESTION, PLAIN_ANSWER = "w5 w7", "w8"
CHAIN = {9: 10, 10: 11, 11: 259, 259: 2, 7: 8, 8: 2}


def scripted_lamed(folder) -> None:
    """Writes a tiny released-layout LaMed with a SegVol decoder (tests/test_lamed's) whose decoder layers add
    nothing (attention and MLP output projections zero), so each next token depends on the last token only:
    one-hot embeddings of the `CHAIN` tokens and an lm_head reading them out. Its answers are known in
    advance, and the rest (vision, projector, prompt splicing, mask decoder) is the real random model."""
    from conftest import word_tokenizer
    from test_lamed import _save_released, tiny_torch_lamed

    reference = tiny_torch_lamed("phi3", segmentation=True)
    llm = reference.llm
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        llm.model.norm.weight.fill_(1.0)
        embed, head = llm.model.embed_tokens.weight, llm.lm_head.weight
        embed.zero_()
        head.zero_()
        for slot, (token, following) in enumerate(CHAIN.items()):
            embed[token, slot] = 1.0
            head[following, slot] = 10.0
    _save_released(reference, folder)
    word_tokenizer(folder, 256)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scripted_lamed")
    scripted_lamed(folder)
    service = Service(Answerer.load(folder), root=tmp_path_factory.mktemp("sessions"))
    yield service
    service.close()


def _nifti(path, shape=(40, 36, 24), spacing=(1.5, 1.5, 3.0)):
    data = np.zeros(shape, np.float32)  # (x, y, z)
    data[8:32, 6:30, 4:20] = 100.0
    data[12:20, 10:18, 8:14] = 400.0
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), path)
    return path


SAMPLING = SamplingConfig(max_new_tokens=6)


def test_scripted_model_answers_with_a_mask_on_the_input_grid(service, tmp_path):
    session = service.new_session()
    volume = service.load(session, [_nifti(tmp_path / "ct.nii.gz")])
    assert volume.path.name == "ct.nii.gz" and volume.array.shape == (1, 24, 36, 40)
    answer = service.ask(session, SEG_QUESTION, SAMPLING)
    assert answer.text == SEG_ANSWER and answer.seconds > 0
    assert answer.mask is not None and answer.mask.shape == (24, 36, 40) and answer.mask.dtype == np.uint8
    assert answer.mask.any(), "the random mask decoder should mark some voxels"
    assert render.mask_volume_ml(answer.mask, render.spacing_of(volume.affine)) == pytest.approx(
        answer.mask.sum() * 1.5 * 1.5 * 3.0 / 1000)
    plain = service.ask(session, PLAIN_QUESTION, SAMPLING)
    assert plain.text == PLAIN_ANSWER and plain.mask is None and plain.boxes == ()
    assert [a.question for a in session.history] == [SEG_QUESTION, PLAIN_QUESTION]


def test_a_box_in_the_answer_maps_to_input_voxels_and_mm(service, tmp_path):
    session = service.new_session()
    service.load(session, [_nifti(tmp_path / "ct.nii.gz")])
    # The scripted model cannot write numbers (its vocabulary is words); the box text goes through the same
    # mapping as a generated one.
    from m3d_jax.inference import input_boxes

    (box,) = input_boxes("it is <bx_start>[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]<bx_end>", session.prepared)
    geometry = session.prepared.geometry
    assert box.first.tolist() == [b.start for b in geometry.box]
    assert all(b.stop - 1 <= end <= b.stop for b, end in zip(geometry.box, box.last))  # the crop's far edge
    affine = session.volume.affine
    np.testing.assert_allclose(box.last_mm, (affine @ np.r_[box.last[::-1], 1.0])[:3])
    # Drawn on the slices crossing it, nowhere else.
    array = session.volume.array[0]
    inside = viewer.box_on_plane(box, "axial", int(box.first[0]), array.shape)
    assert inside == (array.shape[1] - 1 - box.last[1], box.first[2], array.shape[1] - 1 - box.first[1], box.last[2])
    assert viewer.box_on_plane(box, "axial", int(box.last[0]) + 1, array.shape) is None


def test_sessions_keep_their_own_volume_and_chat(service, tmp_path):
    first, second = service.new_session(), service.new_session()
    assert first.folder != second.folder
    service.load(first, [_nifti(tmp_path / "a.nii.gz")])
    np.save(tmp_path / "b.npy", np.random.default_rng(0).random((1, 20, 30, 30), dtype=np.float32))
    service.load(second, [tmp_path / "b.npy"])
    service.ask(first, SEG_QUESTION, SAMPLING)
    assert len(first.history) == 1 and second.history == []
    assert first.volume.array.shape != second.volume.array.shape
    with pytest.raises(InputError, match="load a volume first"):
        service.ask(service.new_session(), PLAIN_QUESTION, SAMPLING)
    service.load(first, [tmp_path / "b.npy"])  # a new volume restarts that session's chat only
    assert first.history == [] and list(first.folder.glob("upload_*")) == []


def test_warm_up_compiles_the_path_the_first_question_takes(service, tmp_path):
    assert service.warm_up(SAMPLING) > 0
    session = service.new_session()
    service.load(session, [_nifti(tmp_path / "ct.nii.gz")])
    assert service.ask(session, "w3 w4 w5 w6 w7", SAMPLING).seconds < 5  # another length, the same bucket


def test_stop_discards_an_answer_still_being_generated(service, tmp_path):
    session = service.new_session()
    service.load(session, [_nifti(tmp_path / "ct.nii.gz")])
    outcome = {}

    def ask():
        try:
            outcome["answer"] = service.ask(session, PLAIN_QUESTION, SAMPLING)
        except InputError as error:
            outcome["error"] = str(error)

    with service.lock:  # the model busy with another request: this question waits, then runs after Stop
        asking = threading.Thread(target=ask)
        asking.start()
        time.sleep(0.2)
        service.stop(session)
    asking.join(60)
    assert outcome == {"error": "stopped: the answer was discarded"} and session.history == []
    assert service.ask(session, PLAIN_QUESTION, SAMPLING).text == PLAIN_ANSWER  # the next question is answered


@pytest.mark.parametrize("name,content,message", [
    ("scan.txt", b"hello", "not a volume the app reads; upload a .nii"),
    ("scan.nii.gz", b"\x1f\x8b\x08\x00garbage", "cannot read NIfTI volume"),
    ("scan.npy", b"not numpy at all", "cannot read .npy volume"),
    ("scan.zip", b"PK\x03\x04broken", "not a readable zip archive"),
])
def test_unreadable_uploads_get_one_line_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UploadError, match=message) as caught:
        load_upload([tmp_path / name], tmp_path / "upload")
    assert str(caught.value).startswith(f"{name}:") and "\n" not in str(caught.value)
    assert str(tmp_path / "upload") not in str(caught.value)  # the server's copy is not shown


def test_wrong_rank_and_too_large_uploads_state_the_problem(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((30, 30), np.float32))
    with pytest.raises(UploadError, match=r"flat.npy: expected \[C, D, H, W\] or \[D, H, W\], got shape \(30, 30\)"):
        load_upload([tmp_path / "flat.npy"], tmp_path / "a")
    np.save(tmp_path / "big.npy", np.zeros((1, 20, 20, 20), np.float32))
    with pytest.raises(UploadError, match="8,000 voxels, over the limit of 1,000 voxels that this app serves"):
        load_upload([tmp_path / "big.npy"], tmp_path / "b", Limits(max_voxels=1000))
    with pytest.raises(UploadError, match=r"big.npy: 32,128 bytes, over the limit of 10,000 bytes"):
        load_upload([tmp_path / "big.npy"], tmp_path / "c", Limits(max_bytes=10_000))


def test_a_four_channel_volume_is_refused_before_the_model(service, tmp_path):
    np.save(tmp_path / "rgb.npy", np.zeros((4, 8, 8, 8), np.float32))
    with pytest.raises(UploadError, match="rgb.npy: 4 channels"):
        service.load(service.new_session(), [tmp_path / "rgb.npy"])


@pytest.mark.parametrize("entry", ["../escape.nii.gz", "/etc/escape.nii.gz", "a/../../escape.nii.gz"])
def test_zip_entries_outside_the_archive_are_refused(tmp_path, entry):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(entry, b"x")
    (tmp_path / "series.zip").write_bytes(buffer.getvalue())
    with pytest.raises(UploadError, match="points outside the archive; refused"):
        load_upload([tmp_path / "series.zip"], tmp_path / "upload" / "inner")
    assert not (tmp_path / "escape.nii.gz").exists() and not (tmp_path / "upload" / "escape.nii.gz").exists()


def test_zip_of_a_volume_and_zip_of_non_dicom_files(tmp_path):
    _nifti(tmp_path / "ct.nii.gz")
    with zipfile.ZipFile(tmp_path / "one.zip", "w") as archive:
        archive.write(tmp_path / "ct.nii.gz", "case/ct.nii.gz")
    assert load_upload([tmp_path / "one.zip"], tmp_path / "a").array.shape == (1, 24, 36, 40)
    np.save(tmp_path / "b.npy", np.zeros((1, 5, 6, 7), np.float32))
    newest = load_upload([tmp_path / "one.zip", tmp_path / "b.npy"], tmp_path / "c")  # the upload box keeps both
    assert newest.path.name == "b.npy" and newest.array.shape == (1, 5, 6, 7)
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as archive:
        archive.writestr("notes/a.txt", "hello")
        archive.writestr("notes/b.txt", "world")
    with pytest.raises(UploadError, match="^notes.zip: "):
        load_upload([tmp_path / "notes.zip"], tmp_path / "b")


def test_views_show_the_mask_box_and_physical_aspect():
    volume = np.zeros((10, 20, 30), np.float32)  # D, H, W with 3 × 1 × 1 mm voxels
    volume[2:8, 5:15, 5:25] = 1.0
    mask = np.zeros(volume.shape, np.uint8)
    mask[4:6, 8:12, 10:20] = 1
    coronal = viewer.slice_image(volume, "coronal", 10, (3.0, 1.0, 1.0), mask=mask, opacity=0.6)
    factor = viewer.enlargement((30, 30))
    assert coronal.shape == (30 * factor, 30 * factor, 3)  # 10 slices of 3 mm = 30 mm high, 30 mm wide
    red = (coronal[..., 0].astype(int) - coronal[..., 1]) > 60
    assert red.sum() == 2 * 3 * 10 * factor * factor  # 2 slices × 3 mm × 10 columns, enlarged
    box = InputBox(np.array([4, 8, 10]), np.array([5, 11, 19]), None, None)
    axial = viewer.slice_image(volume, "axial", 4, (3.0, 1.0, 1.0), boxes=[box])
    assert (axial == render.BOX_COLOUR).all(-1).sum() > 0
    assert viewer.pixel_to_voxel("coronal", 10, (12 * factor, 0), volume.shape, (3.0, 1.0, 1.0)) == (9, 10, 12)


def test_score_plot_clicks_map_to_slices():
    scores = np.linspace(0, 1, 32)
    picture = viewer.score_plot(scores, [31, 30, 29])
    assert picture.shape == (220, 640, 3)
    left = viewer.PLOT_AXES[0] * 640
    width = viewer.PLOT_AXES[2] * 640
    assert viewer.plot_slice(left + width * (10.5 / 32), 32) == 10
    assert viewer.plot_slice(0, 32) == 0 and viewer.plot_slice(639, 32) == 31


def test_phantom_examples_are_the_held_out_cases(tmp_path):
    assert phantom_examples(tmp_path / "none") == []
    root = write_phantoms(tmp_path / "phantoms", num_cases=8, seed=0)
    examples = phantom_examples(root)
    assert examples and all(e.path.is_file() and "? Choices: A. " in e.question and " D. " in e.question
                            and e.answer[:2] in ("A.", "B.", "C.", "D.") for e in examples)  # as the demo trains
    assert all("case_0007" in str(e.path) or "case_0006" in str(e.path) for e in examples)



@pytest.fixture(scope="module")
def med2e3_service(phantom_med2e3, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """The app's service on test_med2e3_tools' phantom-config Med-2E3 (random weights, released layout)."""
    model_dir, _ = phantom_med2e3
    service = Service(Answerer.load(model_dir), root=tmp_path_factory.mktemp("med2e3_sessions"))
    yield service
    service.close()


def test_med2e3_answer_scores_every_slice_and_a_top_slice_click_shows_its_input_slice(med2e3_service, tmp_path):
    from m3d_jax.app import ui
    from m3d_jax.data.med2e3_samples import Med2E3Tokenizers
    from m3d_jax.eval.bench import BenchSettings, generate_med2e3_answers

    service = med2e3_service
    depth = 40  # input slices, resampled to the model's 32
    data = 100 + np.random.default_rng(5).random((30, 36, depth), np.float32)  # (x, y, z), foreground everywhere
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.5, 1.0])), tmp_path / "ct.nii.gz")
    session = service.new_session()
    service.load(session, [tmp_path / "ct.nii.gz"])
    question = "How many lesions are there?"
    answer = service.ask(session, question, SamplingConfig(max_new_tokens=4))

    # The answer and scores are what M3D-Bench's Med-2E3 path (tools/evaluate.py) gives: one prompt builder.
    answerer = service.answerer
    texts, scores = generate_med2e3_answers(answerer.model, Med2E3Tokenizers(answerer.tokenizer,
                                                                             answerer.text_tokenizer),
                                            [question], session.prepared.image[None], BenchSettings(max_new_tokens=4))
    assert answer.text == texts[0]
    slices = answerer.model.config.vision3d.vision.image_size[0]
    assert slices == 32 and answer.slice_scores.shape == (slices,)
    np.testing.assert_allclose(answer.slice_scores, scores[0], atol=1e-5)
    assert answer.slice_scores.sum() == pytest.approx(1.0, abs=1e-4)  # a softmax over the slices

    # Each model slice j comes from input slices [j·40/32, (j+1)·40/32) (the crop is the whole volume).
    assert answer.slice_sources == tuple((int(np.floor(j * depth / slices)), int(np.ceil((j + 1) * depth / slices)) - 1)
                                         for j in range(slices))
    top = answer.top_slices()
    assert len(top) == 5 and top == np.argsort(-answer.slice_scores, kind="stable")[:5].tolist()
    assert f"Top slices by text-guided score: {top[0]} (input {answer.slice_sources[top[0]][0]}–" in \
        ui.describe(answer, session)

    # After the answer the axial viewer shows the top slice's input slice; H and W stay.
    focus = viewer.answer_focus(answer, (3, 7, 11))
    assert focus == [sum(answer.slice_sources[top[0]]) // 2, 7, 11]

    # The plot has a bar per slice, the top ones in their colour; a click on a bar moves the axial viewer.
    picture = viewer.score_plot(answer.slice_scores, top)
    width = picture.shape[1]
    colour = np.array([int(viewer.TOP_COLOUR[i:i + 2], 16) for i in (1, 3, 5)])
    for j in range(slices):
        x = (viewer.PLOT_AXES[0] + viewer.PLOT_AXES[2] * (j + 0.5) / slices) * width
        column = picture[:, int(x)]
        assert (np.abs(column.astype(int) - colour).sum(-1) < 30).any() == (j in top), j
        assert viewer.plot_click_slice(answer, x) == sum(answer.slice_sources[j]) // 2
