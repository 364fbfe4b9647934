"""taskmllm.demo: the Gradio demo (:mod:`.app`), its request handler (:mod:`.handler`) and the bundled
examples (:mod:`.examples`). Importing this package does not import gradio; ``taskmllm.demo.app`` does."""
