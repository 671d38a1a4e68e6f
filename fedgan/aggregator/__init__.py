"""Everything that runs at the aggregator: the ServerApp and what it calls,
the run store and the exporter.

Never imports `fedgan.site`: the two sides share only `fedgan.wire` and
`fedgan.config`."""
