"""App code one level down: the query lives here, the loop in the view."""


def comment_count(conn, post_id):
    return conn.execute("SELECT count(*) FROM comment WHERE post_id = ?", (post_id,)).fetchone()[0]
