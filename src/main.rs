fn main() {
    println!("odoo-cdc: under construction");
}
