"""helios_deploy.api: an HTTP and WebSocket video API in front of the runtime or a Triton server.

    helios-deploy api --artifacts engines/demo/artifacts          # http://127.0.0.1:8080/
    helios-deploy api --triton localhost:8001 --api-key KEY

app.py (the FastAPI app), videos.py + requests.py + jobs.py (OpenAI-style jobs, SQLite store),
realtime.py + fmp4.py (the WebSocket, fragmented MP4 per chunk), backends.py (in-process or Triton),
security.py (keys, limits), metrics.py (Prometheus), serve.py (uvicorn), page/ (the browser page).
"""
