"""The mitmdump entry script: `mitmdump -s addon/cache.py` runs regcache's addon.

mitmproxy puts this script's directory (`addon/`, the source root) on `sys.path`, so the package
`regcache` next to it is imported from the checkout, installed or not. Everything lives in the
package; the addon itself is `regcache.fronts.proxy.RegistryCache`.
"""

from regcache.fronts.proxy import RegistryCache

addons = [RegistryCache()]
