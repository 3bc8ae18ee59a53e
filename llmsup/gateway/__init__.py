"""The gateway: one OpenAI-compatible endpoint in front of every model.

    config       GatewayConfig, resolved from the manifest's `gateway:` section
    app          the aiohttp application: authentication, relaying, OpenAI-shaped errors
    connections  the connection cap and the header and keep-alive timeouts
    routing      Route, the Registry the app asks, and Routing: the swap and idle
                 policy over the daemon's Servers, owning the in-flight counts
    metrics      the gateway's Prometheus metrics, and each model's

    channel      the daemon <-> gateway process messages
    host         the daemon's side: binds the port, runs and restarts the process
    worker       the gateway process: `Servers` seen through the channel

It runs in a process of its own (host starts worker) and knows the daemon only as
`llmsup.control.Servers`, the gateway's part of the `Control` protocol. Nothing is
imported here: the daemon needs `host` alone, not the application's aiohttp.web.
"""
