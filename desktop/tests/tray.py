"""What a desktop shell does with the app's tray icon, on the test's own session bus: a minimal
StatusNotifierWatcher (org.kde.StatusNotifierWatcher) that the app's indicator registers with,
then the item's menu read over com.canonical.dbusmenu (GetLayout) and its items clicked (Event).
Runs its asyncio loop on a thread of its own; the methods are plain calls for the test.
Needs dbus-next (PyPI; tests/setup.sh installs it into its venv)."""

import asyncio
import threading
import time

from dbus_next import BusType, Variant
from dbus_next.aio import MessageBus
from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property, method, signal

WATCHER = "org.kde.StatusNotifierWatcher"


class _Watcher(ServiceInterface):
    def __init__(self, on_item):
        super().__init__(WATCHER)
        self.items = []
        self.on_item = on_item

    @method()
    def RegisterStatusNotifierItem(self, service: "s"):  # noqa: F821 (dbus-next signatures)
        # The sender's bus name comes with the call; ayatana passes its object path here.
        self.on_item(service)

    @method()
    def RegisterStatusNotifierHost(self, service: "s"):  # noqa: F821
        pass

    @dbus_property(access=PropertyAccess.READ)
    def RegisteredStatusNotifierItems(self) -> "as":  # noqa: F821
        return self.items

    @dbus_property(access=PropertyAccess.READ)
    def IsStatusNotifierHostRegistered(self) -> "b":  # noqa: F821
        return True

    @dbus_property(access=PropertyAccess.READ)
    def ProtocolVersion(self) -> "i":  # noqa: F821
        return 0

    @signal()
    def StatusNotifierItemRegistered(self) -> "s":  # noqa: F821
        return self.items[-1] if self.items else ""

    @signal()
    def StatusNotifierHostRegistered(self):
        pass


class Tray:
    """The watcher, started on the session bus of $DBUS_SESSION_BUS_ADDRESS."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.registered = []  # (bus name, object path)
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        if not started.wait(20):
            raise AssertionError("the StatusNotifierWatcher did not start on the session bus")

    def _run(self, started):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        started.set()
        self.loop.run_forever()

    async def _start(self):
        self.bus = await MessageBus(bus_type=BusType.SESSION).connect()
        watcher = _Watcher(lambda service: None)
        self.bus.export("/StatusNotifierWatcher", watcher)
        self.bus.add_message_handler(self._on_message)
        await self.bus.request_name(WATCHER)
        self.watcher = watcher

    def _on_message(self, message):
        # The item's bus name is the call's sender (ayatana passes its object path as the argument).
        if message.member == "RegisterStatusNotifierItem" and message.interface == WATCHER:
            self.registered.append((message.sender, message.body[0]))
        return None  # the exported interface answers it

    def _call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_item(self, timeout):
        """The (bus name, path) of the first item registered within timeout seconds."""
        deadline = time.monotonic() + timeout
        while not self.registered:
            if time.monotonic() > deadline:
                raise AssertionError(f"no tray item registered with the watcher within {timeout} s")
            time.sleep(0.1)
        return self.registered[0]

    def leave(self):
        """The watcher goes away, as when a shell's panel quits: the app's indicator falls back to
        an XEmbed tray icon (xtray.py shows that one)."""
        self._call(self.bus.release_name(WATCHER))

    def come_back(self, timeout):
        """The watcher is back; waits until the item registers with it again."""
        before = len(self.registered)
        self._call(self.bus.request_name(WATCHER))
        deadline = time.monotonic() + timeout
        while len(self.registered) == before:
            if time.monotonic() > deadline:
                raise AssertionError(f"the tray item did not register again within {timeout} s")
            time.sleep(0.1)

    async def _proxy(self, name, path, interface):
        introspection = await self.bus.introspect(name, path)
        obj = self.bus.get_proxy_object(name, path, introspection)
        return obj.get_interface(interface)

    async def _item_props(self, name, path):
        item = await self._proxy(name, path, "org.kde.StatusNotifierItem")
        props = {}
        for prop in ("Id", "Title", "Status", "IconName", "IconThemePath", "Menu"):
            try:
                props[prop] = await getattr(item, "get_" + _snake(prop))()
            except Exception as e:  # an item need not have every property
                props[prop] = e
        return props

    def item(self):
        """The item's properties (IconName, Menu, ...)."""
        name, path = self._item_address()
        return self._call(self._item_props(name, path))

    def _item_address(self):
        sender, service = self.wait_item(60)
        if service.startswith("/"):
            return sender, service
        return service, "/StatusNotifierItem"

    async def _layout(self, name, menu_path):
        menu = await self._proxy(name, menu_path, "com.canonical.dbusmenu")
        _revision, layout = await menu.call_get_layout(0, -1, [])
        return _items(layout)

    def menu(self):
        """The menu's items in order: dicts with id, label, enabled, separator."""
        name, path = self._item_address()
        props = self._call(self._item_props(name, path))
        return self._call(self._layout(name, props["Menu"]))

    def click(self, label):
        """Clicks the menu item labelled `label` (as the shell does: Event "clicked")."""
        name, path = self._item_address()
        props = self._call(self._item_props(name, path))

        async def go():
            items = await self._layout(name, props["Menu"])
            match = [i for i in items if i["label"] == label]
            if not match:
                raise AssertionError(f"no menu item {label!r} in {[i['label'] for i in items]}")
            menu = await self._proxy(name, props["Menu"], "com.canonical.dbusmenu")
            await menu.call_event(match[0]["id"], "clicked", Variant("i", 0), int(time.time()))

        self._call(go())


def _snake(name):
    out = ""
    for c in name:
        out += ("_" + c.lower()) if c.isupper() and out else c.lower()
    return out


def _items(layout):
    _id, _props, children = layout
    items = []
    for child in children:
        cid, props, _ = child.value
        value = {k: v.value for k, v in props.items()}
        items.append({
            "id": cid,
            "label": value.get("label", ""),
            "enabled": value.get("enabled", True),
            "visible": value.get("visible", True),
            "separator": value.get("type") == "separator",
        })
    return items
