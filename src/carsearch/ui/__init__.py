"""The Gradio search page: what it does (`page`), its layout (`app`), rendering, and the
status it shows (`status`). Talks to the platform's search service; may import the
platform and the monitoring reports; never training, ingest or lifecycle."""
