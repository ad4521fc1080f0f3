-- Runs once, as the superuser, when the PostgreSQL volume is first initialised
-- (docker-entrypoint-initdb.d), in the database POSTGRES_DB (odoo), before Odoo
-- creates its tables. The same preparation as the README's quick start.

-- The connector's own role: it may replicate and read, nothing else.
CREATE ROLE odoo_cdc LOGIN REPLICATION PASSWORD 'odoo_cdc';
GRANT CONNECT ON DATABASE odoo TO odoo_cdc;
GRANT USAGE ON SCHEMA public TO odoo_cdc;
-- Tables Odoo creates later (as role odoo) become readable too (odoo-cdc check
-- and the snapshot read them).
ALTER DEFAULT PRIVILEGES FOR ROLE odoo IN SCHEMA public GRANT SELECT ON TABLES TO odoo_cdc;

-- FOR ALL TABLES covers tables created after it, so it can exist before Odoo
-- installs its modules. Narrow it with odoo-cdc's filters, or replace it with
-- FOR TABLE sale_order, sale_order_line, res_partner, ... once they exist.
CREATE PUBLICATION odoo_cdc FOR ALL TABLES;
