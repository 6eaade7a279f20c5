"""The baseline of the hot-path benchmark: a bare FastAPI hello-world app (served by uvicorn).

python -m uvicorn _hello:app --app-dir benchmarks --workers 2 --no-access-log
"""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
async def hello() -> dict[str, str]:
    return {"message": "Hello World"}
