"""The Gradio page: upload or example → three linked slice viewers (axial, coronal, sagittal) with window
presets; a chat with the model whose answers draw on the viewers (boxes, [SEG] masks, Med-2E3's slice
scores). Callbacks are thin: the work is in `session` (model, uploads, chat) and `viewer` (pictures)."""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr
import numpy as np

from m3d_jax import render
from m3d_jax.app import viewer
from m3d_jax.app.session import Example, Service, Session
from m3d_jax.errors import InputError, first_line
from m3d_jax.generate import SamplingConfig
from m3d_jax.inference import Answer, save_mask

MAX_NEW_TOKENS = (32, 64, 128, 256)
DEFAULT_MAX_NEW_TOKENS = 64
MODEL_NAMES = {"lamed": "M3D-LaMed", "med2e3": "Med-2E3"}
STOP_HELP = ("<small>Stop takes a question still waiting in the queue off it. An answer already being generated "
             "cannot be interrupted (the compiled generate runs to its end, at most *Max new tokens*); Stop "
             "discards it when it arrives.</small>")
CSS = """
#status {min-height: 1.5em}
.viewer img {image-rendering: pixelated; object-fit: contain}
"""


def sampling_of(max_new_tokens: int, temperature: float, top_p: float) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))


def _views(session: Session | None, positions, window_name: str, opacity: float) -> list[np.ndarray | None]:
    """The three viewer images of a session at slice `positions` (D, H, W)."""
    if session is None or session.prepared is None:
        return [None, None, None]
    volume = session.prepared.volume
    array = volume.array[0]
    position = [int(np.clip(p, 0, n - 1)) for p, n in zip(positions, array.shape)]
    last = session.last
    mask = last.mask if last is not None else None
    boxes = last.boxes if last is not None else ()
    level_width = render.WINDOWS[window_name]
    if level_width is None:  # the volume's range, not each slice's, so the three views show the same greys
        low, high = float(array.min()), float(array.max())
        level_width = ((low + high) / 2, max(high - low, 1e-6))
    return [viewer.slice_image(array, view, position[axis], render.spacing_of(volume.affine),
                               level_width=level_width, mask=mask, opacity=opacity, boxes=boxes,
                               position=position) for axis, view in enumerate(render.VIEWS)]


def _chat(history: list[Answer]) -> list[dict]:
    messages = []
    for answer in history:
        messages.append({"role": "user", "content": answer.question})
        messages.append({"role": "assistant", "content": answer.text or "(empty answer)"})
    return messages


def describe(answer: Answer, session: Session) -> str:
    """Markdown under the chat: time taken, boxes in voxels and mm, the mask's volume, Med-2E3's top slices."""
    volume = session.prepared.volume
    lines = [f"**Answered in {answer.seconds:.2f} s.**"]
    for number, box in enumerate(answer.boxes, 1):
        line = f"Box {number}: voxels (D, H, W) {box.first.tolist()} – {box.last.tolist()}"
        if box.first_mm is not None:
            line += (f"; scanner RAS mm {np.round(box.first_mm, 1).tolist()} – "
                     f"{np.round(box.last_mm, 1).tolist()}")
        lines.append(line + " (outlined in cyan on the slices that cross it)")
    if answer.mask is not None:
        ml = render.mask_volume_ml(answer.mask, render.spacing_of(volume.affine))
        unit = "" if volume.affine is not None else " (no voxel size in a .npy: 1 mm assumed)"
        lines.append(f"Mask: {int(answer.mask.sum()):,} voxels, **{ml:.2f} mL**{unit} (orange on the slices)")
    elif "[SEG]" in answer.raw:
        lines.append("The answer has a [SEG] but this model has no mask decoder.")
    if answer.slice_scores is not None:
        tops = ", ".join(f"{j} (input {answer.slice_sources[j][0]}–{answer.slice_sources[j][1]})"
                         for j in answer.top_slices())
        lines.append(f"Top slices by text-guided score: {tops}")
    return "\n\n".join(lines)


def example_label(example: Example) -> str:
    """The case, the question without its choices (the box fills them in) and the set's answer, in the 60
    characters Gradio shows of a label."""
    label = f"{example.path.parent.name}: {example.question.split(' Choices:')[0]}"
    return label + (f" → {example.answer.split('. ', 1)[-1]}" if example.answer else "")


def _unchanged(count: int) -> list:
    return [gr.update() for _ in range(count)]


def _click_handler(view: str):
    """A select callback for `view`'s image: the (D, H, W) slider values of the voxel clicked."""

    def on_click(session: Session | None, d: int, h: int, w: int, evt: gr.SelectData):
        if session is None or session.prepared is None:
            return d, h, w
        volume = session.prepared.volume
        return viewer.pixel_to_voxel(view, (d, h, w)[render.VIEWS.index(view)], evt.index, volume.array.shape[1:],
                                     render.spacing_of(volume.affine))

    return on_click


def build(service: Service, examples: list[Example] = (), title: str = "m3d-jax") -> gr.Blocks:
    """The page, bound to `service`; each browser session gets its own `Session` in a `gr.State`."""
    answerer = service.answerer
    model_line = (f"{MODEL_NAMES.get(answerer.kind, answerer.kind)} model, input "
                  f"{tuple(answerer.vision.image_size)} (D, H, W)"
                  f"{', with a mask decoder' if answerer.segments else ''}")
    # Made before the layout (rendered in the chat column) so that the examples above the viewers can fill it.
    question = gr.Textbox(label="Question", placeholder="e.g. Where is the lesion? Please segment it.",
                          elem_id="question", lines=1, render=False)
    with gr.Blocks(title=title) as page:
        state = gr.State(None, delete_callback=lambda session: session and session.close())
        gr.Markdown(f"## {title}: ask about a 3D scan\n{model_line}. Upload a volume (or click an example), "
                    "scroll the slices, then ask. Research software, not for clinical use.")
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    upload = gr.File(label="Volume: .nii / .nii.gz / .npy, or a DICOM series (.zip or its files)",
                                     file_count="multiple", elem_id="upload", scale=3, height=120)
                    window_name = gr.Radio(list(render.WINDOWS), value="full range", label="Window (CT)",
                                           elem_id="window", scale=2)
                if examples:  # next to the upload box, where a newcomer looks first
                    gr.Examples([[[str(e.path)], e.question] for e in examples], inputs=[upload, question],
                                example_labels=[example_label(e) for e in examples], elem_id="examples",
                                label="Demo phantoms (held-out cases of configs/demo.py's set, → the true answer): "
                                      "click one, then Ask")
                images, sliders = [], []
                with gr.Row():
                    for view in render.VIEWS:
                        with gr.Column(min_width=160):
                            images.append(gr.Image(label=view, type="numpy", interactive=False,
                                                   elem_id=f"view-{view}", elem_classes="viewer",
                                                   buttons=["download"]))
                            sliders.append(gr.Slider(0, 1, value=0, step=1, label=f"{view} slice",
                                                     elem_id=f"slider-{view}"))
                # Without a mask decoder there is never a mask: no opacity slider, no mask download.
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Mask opacity", elem_id="opacity",
                                    visible=answerer.segments)
                plot = gr.Image(label="Slice scores (Med-2E3)", type="numpy", interactive=False, visible=False,
                                elem_id="score-plot")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="Chat", height=380, elem_id="chat")
                question.render()
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("Clear chat", elem_id="clear")
                gr.Markdown(STOP_HELP, elem_id="stop-help")
                with gr.Accordion("Sampling settings", open=False):
                    gr.Markdown("Greedy at temperature 0. A new setting compiles once (seconds to minutes).")
                    max_new = gr.Dropdown(list(MAX_NEW_TOKENS), value=DEFAULT_MAX_NEW_TOKENS,
                                          label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.1, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                details = gr.Markdown("", elem_id="details")
                mask_file = gr.File(label="Mask (NIfTI with the input's affine)", interactive=False,
                                    elem_id="mask-file", height=80, visible=answerer.segments)

        view_inputs = [state, *sliders, window_name, opacity]

        def redraw(session, d, h, w, window_value, opacity_value):
            return _views(session, (d, h, w), window_value, opacity_value)

        def on_upload(files, session, window_value, opacity_value):
            session = session or service.new_session()
            if not files:
                return session, *_unchanged(10)
            paths = [Path(f if isinstance(f, str) else f.name) for f in files]
            try:
                volume = service.load(session, paths)
            except InputError as error:
                return session, f"⚠️ {error}", *_unchanged(9)
            shape = volume.array.shape[1:]
            centre = [n // 2 for n in shape]
            spacing = render.spacing_of(volume.affine)
            message = (f"Loaded {volume.path.name}: {shape[0]} × {shape[1]} × {shape[2]} voxels (D, H, W), "
                       f"{spacing[0]:.2g} × {spacing[1]:.2g} × {spacing[2]:.2g} mm.")
            updates = [gr.Slider(minimum=0, maximum=n - 1, value=c) for n, c in zip(shape, centre)]
            return (session, message, *updates, *_views(session, centre, window_value, opacity_value), [], None,
                    gr.Image(visible=False))

        upload.change(on_upload, [upload, state, window_name, opacity],
                      [state, status, *sliders, *images, chat, mask_file, plot])

        for slider in sliders:
            slider.change(redraw, view_inputs, images, trigger_mode="always_last", show_progress="hidden")
        window_name.change(redraw, view_inputs, images, show_progress="hidden")
        opacity.change(redraw, view_inputs, images, trigger_mode="always_last", show_progress="hidden")

        def on_ask(text, session, d, h, w, window_value, opacity_value, max_new_value, temperature_value, top_p_value):
            session = session or service.new_session()
            try:
                answer = service.ask(session, text, sampling_of(max_new_value, temperature_value, top_p_value))
            except InputError as error:
                return session, _chat(session.history), f"⚠️ {error}", *_unchanged(7)
            except Exception as error:  # a bug: keep the page alive, the traceback goes to the server log
                logging.exception("answering %r failed", text)
                return session, _chat(session.history), f"⚠️ the model failed: {first_line(error)}", *_unchanged(7)
            position = viewer.answer_focus(answer, (d, h, w))
            mask_path = None
            if answer.mask is not None:
                mask_path = str(save_mask(answer.mask, session.volume, session.folder,
                                          f"mask_{len(session.history):03d}"))
            plot_update = gr.Image(visible=False)
            if answer.slice_scores is not None:
                plot_update = gr.Image(viewer.score_plot(answer.slice_scores, answer.top_slices()), visible=True)
            return (session, _chat(session.history), "", describe(answer, session),
                    *[gr.Slider(value=p) for p in position], mask_path, plot_update, "")

        ask_inputs = [question, state, *sliders, window_name, opacity, max_new, temperature, top_p]
        ask_outputs = [state, chat, status, details, *sliders, mask_file, plot, question]
        events = [trigger(on_ask, ask_inputs, ask_outputs, concurrency_limit=1, concurrency_id="model")
                  .then(redraw, view_inputs, images, show_progress="hidden")
                  for trigger in (ask.click, question.submit)]

        def on_stop(session):
            service.stop(session)
            return "Stopped: the answer was discarded."

        stop.click(on_stop, state, status, cancels=events, queue=False)

        def on_clear(session):
            if session is not None:
                session.history.clear()
            return session, [], "", None, gr.Image(visible=False)

        clear.click(on_clear, state, [state, chat, details, mask_file, plot]).then(redraw, view_inputs, images)

        for view, image in zip(render.VIEWS, images):  # a click on one view moves the other two there
            image.select(_click_handler(view), [state, *sliders], sliders)

        def on_plot_click(session, d, evt: gr.SelectData):
            last = session.last if session is not None else None
            if last is None or last.slice_scores is None:
                return d
            return viewer.plot_click_slice(last, evt.index[0])

        plot.select(on_plot_click, [state, sliders[0]], sliders[0])
    return page


def serve(page: gr.Blocks, host: str, port: int, max_file_size: int, **launch) -> None:
    """Queues requests (the model answers one at a time) and serves the page."""
    page.queue(default_concurrency_limit=4).launch(server_name=host, server_port=port, max_file_size=max_file_size,
                                                   css=CSS, show_error=False, **launch)
