"""`llmlab serve`: an OpenAI-compatible server with continuous batching over the paged cache.

  args.py       ServeArgs: the command's settings (its flags are derived from them)
  server.py     start the engine process, build the app, run uvicorn, drain on SIGTERM
  app.py        the endpoints, the API key, body limits, OpenAI-shaped responses and errors
  protocol.py   request bodies (pydantic, strict) and the error object
  client.py     the server's side of the engine: requests and aborts out, tokens back as text events
  ---- in the engine process ----
  core.py       the engine process: its pipe to the server, its loop
  loading.py    load a run or a Hugging Face folder, size the paged cache, build the engine
  scheduler.py  continuous batching: admission, joining and leaving between steps, aborts
  engine.py     the model and its paged cache: prefill newcomers, decode all, per-request sampling
  chat.py       chat templates: the model's own (sandboxed Jinja) or the default
  metrics.py    Prometheus metrics
  page.py       the chat page at / (static/chat.html)
"""
