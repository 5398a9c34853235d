"""A web app (Gradio) for asking M3D-LaMed or Med-2E3 about a 3D volume and looking at the answer:
`python -m m3d_jax.app --ckpt=CKPT`. `session` holds the model and the per-browser state, `viewer` draws
the slices, `ui` lays out the page."""
