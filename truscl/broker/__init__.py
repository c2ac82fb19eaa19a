"""The MQTT broker: run mosquitto as a child process, and provision a deployment's broker.

Provisioning (:mod:`truscl.broker.provision`) needs the ``cryptography`` package of the server
extra, so it is imported on its own and not from here: a device that only runs the demo broker
does not need it.
"""

from truscl.broker.runner import BrokerFailed, Mosquitto, free_port, listener_of

__all__ = ["BrokerFailed", "Mosquitto", "free_port", "listener_of"]
