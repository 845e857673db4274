"""The Gradio search page: what it does (`page`), its layout (`app`), rendering, the
status it shows (`status`), its doors (`guard`: the login gate, the served files, size
and per-client limits) and the JSON API beside it (`api`, at /api/v1). Talks to the
platform's search service; may import the platform, the monitoring reports and the
client's wire models (`carsearch.client.models`); never training, ingest or lifecycle."""
