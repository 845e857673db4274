"""The Gradio search page: what it does (`page`), its layout (`app`), rendering, the
status it shows (`status`) and its doors (`guard`: the login gate, the served files, size
and per-client limits). Talks to the platform's search service; may import the platform
and the monitoring reports; never training, ingest or lifecycle."""
