"""Strategy search: the fastest plan that fits, exact with respect to the cost model over the space
described in :mod:`strategies.search.space`."""

from galvatron.strategies.search.search import SearchResult, search
from galvatron.strategies.search.space import ALL_CAPABILITIES, SearchOptions

__all__ = ["ALL_CAPABILITIES", "SearchOptions", "SearchResult", "search"]
