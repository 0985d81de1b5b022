"""A fake Kubernetes API server for the kubernetes executor's end-to-end test.

kmock's in-memory emulator (PyPI `kmock`), plus what a real API server does that the
executor relies on: resource versions, uids and creation timestamps on every object,
equality-based label selectors on lists and watches, list kinds, and pod logs (read from
`<logs>/<pod>.log`, which the test writes as it plays the kubelet). There is no Job
controller, scheduler or kubelet: the test plays them.

    python fake_kube.py <logs dir>     # prints "listening on <port>" once it serves
"""

import asyncio
import datetime
import itertools
import pathlib
import sys
import uuid

import aiohttp.web
import kmock

VERSIONS = itertools.count(1)
# The reasons a real API server gives (clients match on them).
REASONS = {404: "NotFound", 409: "AlreadyExists", 422: "Invalid"}


def matches(obj, selector):
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKube(kmock.KubernetesEmulator):
    logs: pathlib.Path = pathlib.Path(".")

    async def _handle(self, request):
        if request.url.path.endswith("/log"):
            pod = request.url.path.split("/")[-2]
            path = self.logs / f"{pod}.log"
            text = path.read_text() if path.exists() else ""
            tail = int(request.params.get("tailLines", "0") or 0)
            if tail:
                text = "\n".join(text.splitlines()[-tail:])
            return aiohttp.web.Response(text=text, content_type="text/plain")
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault(
                    "creationTimestamp",
                    datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                )
                if request.namespace:
                    meta.setdefault("namespace", request.namespace)
            if request.action in (kmock.action.CREATE, kmock.action.UPDATE):
                meta["resourceVersion"] = str(next(VERSIONS))
        try:
            return await super()._handle(request)
        except kmock.KubernetesError as e:
            # Answered as the API server does (kmock lets some of these become a 500).
            return aiohttp.web.json_response(
                {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                 "code": e.status, "reason": REASONS.get(e.status, "InternalError"),
                 "message": e.message or ""},
                status=e.status,
            )

    async def _serve_list(self, request):
        listed = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        listed["items"] = [o for o in listed["items"] if matches(o, selector)]
        listed["kind"] = "List"
        listed["apiVersion"] = "v1"
        listed["metadata"] = {"resourceVersion": str(next(VERSIONS))}
        return listed

    async def _serve_watch(self, request):
        selector = request.params.get("labelSelector")
        async for event in super()._serve_watch(request):
            if not isinstance(event, dict) or matches(event.get("object") or {}, selector):
                yield event


async def main():
    fake = FakeKube()
    fake.logs = pathlib.Path(sys.argv[1])
    fake.resources.load_bundled()
    # The LoraJob custom resource (its CRD is not checked here: kmock validates nothing).
    fake.resources["loraforge.dev/v1alpha1/lorajobs"] = {"kind": "LoraJob", "namespaced": True}
    async with kmock.Server(fake) as server:
        print(f"listening on {server.port}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
