-- wrk script: POST /v1/jobs with a Bearer key (env FLUXGATE_API_KEY), small text-to-image jobs.
-- wrk -t2 -c50 -d20s -s bench/wrk/submit.lua --latency http://127.0.0.1:8000/v1/jobs
-- No response() callback: wrk then skips handing each body to Lua, and reports any status other than
-- 2xx/3xx itself ("Non-2xx or 3xx responses").
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("FLUXGATE_API_KEY") or "fg-local-admin")
wrk.body = '{"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "num_inference_steps": 4}'
