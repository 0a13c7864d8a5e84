"""``cvseg replay BAG [--rate R] [--loop]``: publish a rosbag2's messages over DDS with their
recorded timing, like ``ros2 bag play`` on machines without ros2cli (rclpy, imported in :func:`replay`)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from cvseg_ros.ros.bags import _reader

@dataclass
class ReplayEvent:
    topic: str
    msgtype: str
    log_ns: int
    raw: bytes
    sent_ns: int       # time.monotonic_ns() right after publish
    loop: int


def _ros_message_class(msgtype: str):
    import importlib
    pkg, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


def replay(bag: str | Path, *, rate: float = 1.0, loop: bool = False, reliability: str = "reliable",
           depth: int = 100, topics: Sequence[str] | None = None, wait_for_subscribers: float = 0.0,
           context=None, node=None, on_publish: Callable[[ReplayEvent], None] | None = None,
           should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] = print) -> int:
    """Publish a bag's messages over DDS with their recorded timing (scaled by ``rate``).

    Messages go out serialized as stored (no re-serialisation). ``wait_for_subscribers``: wait up
    to that many seconds for every topic to have a subscriber before starting. With ``node``
    (and its ``context``) the caller's node publishes; otherwise a node ``cvseg_replay`` is made
    in a fresh context (ROS_DOMAIN_ID from the environment). Returns the messages published.
    """
    import rclpy
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    if rate <= 0:
        raise ValueError("--rate must be > 0")
    if reliability not in ("reliable", "best_effort"):
        raise ValueError(f"unknown reliability {reliability!r}: reliable or best_effort")
    own = node is None
    if own:
        context = rclpy.context.Context()
        rclpy.init(context=context)
        node = rclpy.create_node("cvseg_replay", context=context)
    context = context or node.context
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, durability=DurabilityPolicy.VOLATILE,
                     reliability=ReliabilityPolicy.RELIABLE if reliability == "reliable"
                     else ReliabilityPolicy.BEST_EFFORT)
    published = 0
    pubs = {}
    try:
        with _reader(bag) as reader:
            conns = []
            for c in reader.connections:
                if topics is not None and c.topic not in topics:
                    continue
                try:
                    cls = _ros_message_class(c.msgtype)
                except (ImportError, AttributeError, ValueError):
                    log(f"replay: skipping {c.topic}: message type {c.msgtype} is not importable here")
                    continue
                if c.topic not in pubs:
                    pubs[c.topic] = node.create_publisher(cls, c.topic, qos)
                conns.append(c)
            if not conns:
                raise ValueError(f"{bag}: nothing to replay (topics {topics or 'all'})")
            if wait_for_subscribers > 0:
                deadline = time.monotonic() + wait_for_subscribers
                while time.monotonic() < deadline and context.ok() and \
                        not all(p.get_subscription_count() > 0 for p in pubs.values()):
                    time.sleep(0.05)
                missing = [t for t, p in pubs.items() if p.get_subscription_count() == 0]
                if missing:
                    log(f"replay: no subscriber after {wait_for_subscribers:.0f} s on {', '.join(missing)}")
                time.sleep(0.5)   # let the reliable handshake finish on both sides
            duration = max(reader.end_time - reader.start_time, 0)
            first = reader.start_time
            t0 = time.monotonic()
            loop_index = 0
            while True:
                offset = loop_index * (duration + 1e8)   # 0.1 s between loops
                for conn, log_ns, raw in reader.messages(connections=conns):
                    if not context.ok() or (should_stop is not None and should_stop()):
                        return published
                    target = t0 + (log_ns - first + offset) / 1e9 / rate
                    delay = target - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    pubs[conn.topic].publish(bytes(raw))
                    published += 1
                    if on_publish is not None:
                        on_publish(ReplayEvent(conn.topic, conn.msgtype, int(log_ns), bytes(raw),
                                               time.monotonic_ns(), loop_index))
                loop_index += 1
                if not loop:
                    return published
    except KeyboardInterrupt:
        if not own:
            raise
        log(f"replay: interrupted after {published} messages")
        return published
    finally:
        if own:
            node.destroy_node()
            rclpy.try_shutdown(context=context)


def register(sub) -> None:
    rp = sub.add_parser("replay", help="publish a bag over DDS with its timing (like `ros2 bag play`)")
    rp.add_argument("bag")
    rp.add_argument("--rate", type=float, default=1.0)
    rp.add_argument("--loop", action="store_true")
    rp.add_argument("--qos", choices=("reliable", "best_effort"), default="reliable")
    rp.add_argument("--topic", action="append", default=None, help="only these topics (repeat)")
    rp.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="S",
                    help="wait up to S seconds for a subscriber on every topic before starting")
    rp.set_defaults(func=_replay_main)


def _replay_main(args) -> int:
    n = replay(args.bag, rate=args.rate, loop=args.loop, reliability=args.qos, topics=args.topic,
               wait_for_subscribers=args.wait_for_subscribers)
    print(f"replayed {n} messages")
    return 0
