"""A device certificate profile for unit tests that issue certificates directly."""

from agent.enroll.messages import Platform
from agent.registrar.ca import DeviceProfile
from agent.registrar.config import Publication

PUBLICATION = Publication(crl_url="http://pki.test/v1/crl",
                          ca_issuers_url="http://pki.test/v1/ca/issuing.crt")
PROFILE = DeviceProfile(hw_serial=b"\x01\x23\x45",
                        platform=Platform(manufacturer="Acme", model="GW-100", serial="SN-42",
                                          version="1.2.3"))
