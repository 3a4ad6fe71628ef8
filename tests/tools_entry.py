"""Server-side tools loaded by entry point, as ``duplex serve --tools`` does (tests only)."""

from __future__ import annotations

from server.tools import ToolRegistry

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
    "required": ["city"],
}


def register(tools: ToolRegistry) -> None:
    """The hook form: a function that registers tools on the server's registry."""

    @tools.register(parameters=WEATHER_PARAMETERS)
    async def get_weather(city: str, unit: str = "celsius") -> dict:
        """Current weather for a city."""
        return {"city": city, "sky": "sunny", "temp": 21, "unit": unit}


#: The registry form.
registry = ToolRegistry()


@registry.register
async def clock() -> str:
    """The time of day."""
    return "noon"
