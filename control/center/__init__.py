"""The control center (`xdpgw center`): data centers, master images and region-offload
distribution requests, persisted in SQLite; an HTTP/JSON API (aiohttp) with token auth.

    config.py    the center's TOML config (listen, token, db, weights, data centers, gateways, regions, images)
    store.py     SQLite (WAL) state: data centers, images, requests and their history (no [store]: one replica)
    kvstore.py   the same state on the shared store (control/store, etcd): every replica reads and writes it
    leader.py    a replica's leader election: the leader drives the workflow, standbys serve the API
    scoring.py   target search: pluggable weighted factors, `explain`
    workflow.py  the request state machine and the engine that drives it (idempotent steps, retries)
    server.py    the HTTP API
    client.py    clients: CenterClient (sync, for gateways and the CLI), AgentClient (async, for the center)
"""
