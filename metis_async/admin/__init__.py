"""Watching and steering a running controller: the Admin gRPC service (`service`), the view it
and the dashboard read (`view`), the history of versions and evaluations (`history`) and the
command line's client (`client`). The wire contract is `proto/metis_async/v1/admin.proto`."""
