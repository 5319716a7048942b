def summarize_orders(orders, tax_rate):
    """Return the subtotal, the tax and the total of a list of orders.

    Each order is a dictionary with a price, a quantity and an optional
    discount between zero and one. Orders with a quantity of zero are
    skipped, and a negative price is an error.
    """
    subtotal = 0.0
    skipped = 0
    for order in orders:
        price = order["price"]
        quantity = order["quantity"]
        discount = order.get("discount", 0.0)
        if quantity == 0:
            skipped += 1
            continue
        if price < 0:
            raise ValueError(f"negative price in order {order!r}")
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"discount out of range in order {order!r}")
        subtotal += price * quantity * (1.0 - discount)
    tax = round(subtotal * tax_rate, 2)
    total = round(subtotal + tax, 2)
    return {
        "subtotal": round(subtotal, 2),
        "tax": tax,
        "total": total,
        "skipped": skipped,
    }


def cheapest_order(orders):
    """Return the order with the lowest price per unit, or None when there are no orders."""
    best = None
    for order in orders:
        if order["quantity"] == 0:
            continue
        if best is None or order["price"] < best["price"]:
            best = order
    return best


def print_report(orders, tax_rate):
    summary = summarize_orders(orders, tax_rate)
    print("Subtotal:", summary["subtotal"])
    print("Tax:", summary["tax"])
    print("Total:", summary["total"])
    if summary["skipped"]:
        print("Skipped orders:", summary["skipped"])
    best = cheapest_order(orders)
    if best is not None:
        print("Cheapest order:", best["price"])
