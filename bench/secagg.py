"""CPU seconds per stage and bytes on the wire of one secure-aggregation
round, in process (no network), against plain fp32 FedAvg of the same
vectors. Prints figures; never part of the tests.

    .venv/bin/python bench/secagg.py [--sites 3 10 20] [--params 1e6 5e6 10e6]
        [--bits 8] [--drop 0.1]

Client figures are per site (the mean over sites); server figures are for
the whole round. --drop is the fraction of sites that vanish after sharing
keys (before sending their masked input), which makes the server rebuild
their pairwise masks.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedgan.secagg.client import SiteSession
from fedgan.secagg.params import SecAggParams
from fedgan.secagg.server import ServerSession
from tests.secagg_sim import Consortium, site_ids


def cpu(fn, *args):
    start = time.process_time()
    out = fn(*args)
    return out, time.process_time() - start


def one_round(n: int, length: int, bits: int, drop: float, consortium: Consortium) -> dict:
    rng = np.random.default_rng(0)
    ids = site_ids(n)
    params = SecAggParams.for_round("bench", 1, n, bits=bits, value_range=0.05, length=length)
    updates = {s: rng.normal(0, 0.01, length).astype(np.float32) for s in ids}
    client: dict[str, list[float]] = defaultdict(list)
    server: dict[str, float] = {}
    wire: dict[str, int] = defaultdict(int)  # bytes sent per site, summed over sites

    srv = ServerSession(params)
    sessions, ads = {}, []
    for s in ids:
        (session, ad), t = cpu(SiteSession.start, params, srv.public_key, consortium.signer(s))
        sessions[s] = session
        ads.append(ad)
        client["advertise"].append(t)
        wire["advertise"] += len(ad.c_pk) + len(ad.s_pk) + len(ad.cert_pem) + len(ad.signature)
    roster, server["advertise"] = cpu(srv.advertised, ads)
    verify = consortium.verifier()
    shares = {}
    for s in ids:
        shares[s], t = cpu(sessions[s].share_keys, roster, verify)
        client["share"].append(t)
        wire["share"] += sum(len(x.ciphertext) for x in shares[s])
    routed, server["share"] = cpu(srv.shared, shares)
    dropped = set(ids[: round(drop * n)])
    envelopes = {}
    for s in ids:
        (envelope, _), t = cpu(sessions[s].masked_input, updates[s], routed[s], srv.u2)
        client["mask"].append(t)
        if s not in dropped:
            envelopes[s] = envelope
            wire["mask"] += len(envelope)
    (survivors, _), server["mask"] = cpu(srv.received_masked, envelopes)
    signatures = {}
    for s in survivors:
        signatures[s], t = cpu(sessions[s].confirm, survivors, consortium.signer(s))
        client["confirm"].append(t)
        wire["confirm"] += len(signatures[s])
    confirmed, server["confirm"] = cpu(srv.confirmed, signatures)
    reveals = {}
    for s in survivors:
        reveals[s], t = cpu(sessions[s].unmask, confirmed)
        client["unmask"].append(t)
        wire["unmask"] += sum(len(r.value) + 16 for r in reveals[s])
    aggregate, server["unmask"] = cpu(srv.unmasked, reveals)
    assert aggregate.survivors == survivors

    plain = [updates[s] for s in survivors]
    _, plain_server = cpu(lambda: np.mean(plain, axis=0))
    per_site_bytes = sum(wire.values()) / n
    return {
        "client": {k: float(np.mean(v)) for k, v in client.items()},
        "server": server,
        "bytes_per_param": per_site_bytes / length,
        "plain_server": plain_server,
        "dtype": params.dtype.name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 20])
    parser.add_argument("--params", type=float, nargs="+", default=[1e6, 5e6, 10e6])
    parser.add_argument("--bits", type=int, default=8, choices=(8, 12, 16))
    parser.add_argument("--drop", type=float, default=0.0)
    parser.add_argument(
        "--flower", action="store_true", help="also run Flower's SecAgg+ on the same vectors"
    )
    args = parser.parse_args()
    consortium = Consortium()
    print(f"bits {args.bits}, dropped after sharing: {args.drop:.0%} of sites; CPU seconds")
    print(
        f"{'n':>3} {'params':>7} {'packed':>7} | client: {'adv':>5} {'share':>5} {'mask':>6} "
        f"{'unmask':>6} | server: {'share':>5} {'mask':>6} {'unmask':>6} {'total':>6} | "
        f"{'B/param':>7} | plain fp32: server {'mean':>5}, 4.00 B/param"
    )
    for n in args.sites:
        for p in args.params:
            r = one_round(n, int(p), args.bits, args.drop, consortium)
            c, s = r["client"], r["server"]
            print(
                f"{n:>3} {p / 1e6:>6.0f}M {r['dtype']:>7} | "
                f"{c['advertise']:>13.4f} {c['share']:>5.3f} {c['mask']:>6.2f} "
                f"{c.get('unmask', 0):>6.3f} | "
                f"{s['share']:>13.3f} {s['mask']:>6.2f} {s['unmask']:>6.2f} "
                f"{sum(s.values()):>6.2f} | {r['bytes_per_param']:>7.3f} | "
                f"{r['plain_server']:>17.2f}",
                flush=True,
            )
            if args.flower:
                from flower_secaggplus import secaggplus_round

                f = secaggplus_round(n, int(p), args.bits)
                ours = (
                    c["advertise"]
                    + c["share"]
                    + c["mask"]
                    + c.get("confirm", 0)
                    + c.get("unmask", 0)
                )
                print(
                    f"    Flower SecAgg+: client {f['client']:.2f} s/site (ours {ours:.2f}, "
                    f"{f['client'] / ours:.1f}x), server {f['server']:.2f} s "
                    f"(ours {sum(s.values()):.2f}, {f['server'] / sum(s.values()):.1f}x), "
                    f"{f['bytes_per_param']:.2f} B/param",
                    flush=True,
                )


if __name__ == "__main__":
    main()
