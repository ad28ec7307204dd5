"""The tabs of the page, one module each: ``layout(ui)`` makes and registers its components, ``wire(ui)`` connects
its module-level handlers to events (after every tab's layout exists, so a tab can update another's)."""
